//! Client-supplied file names, made safe to echo back and to log.
//!
//! The name is only ever a label: avgate never writes uploads to disk, so a
//! name is not a path. Still, it ends up in JSON answers, logs and the
//! clients' own UIs, where `../`, control characters or a right-to-left
//! override (`invoice\u{202E}fdp.exe` shown as `invoiceexe.pdf`) do harm.

/// Longest name we keep, in bytes (common file-system limit).
pub const MAX_LEN: usize = 255;

/// Returns the sanitized name, or `None` when nothing usable is left.
pub fn sanitize(raw: &str) -> Option<String> {
    // Keep the last path component, whichever separator the client used.
    let base = raw.rsplit(['/', '\\']).next().unwrap_or(raw);
    let cleaned: String = base
        .chars()
        .filter(|&c| !c.is_control() && !is_invisible_formatting(c))
        .collect();
    let trimmed = cleaned.trim();
    if trimmed.is_empty() || trimmed.chars().all(|c| c == '.') {
        return None;
    }
    let mut end = trimmed.len().min(MAX_LEN);
    while !trimmed.is_char_boundary(end) {
        end -= 1;
    }
    Some(trimmed[..end].to_owned())
}

/// Bidirectional overrides and isolates, zero-width characters and the
/// BOM: invisible, and used to disguise file extensions.
fn is_invisible_formatting(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
        | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{2069}' // bidi isolates
        | '\u{FEFF}'              // BOM
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        assert_eq!(sanitize("eicar.com").as_deref(), Some("eicar.com"));
        assert_eq!(
            sanitize("Rapport été.pdf").as_deref(),
            Some("Rapport été.pdf")
        );
    }

    #[test]
    fn paths_are_cut_to_the_last_component() {
        assert_eq!(sanitize("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(sanitize("C:\\Users\\x\\a.doc").as_deref(), Some("a.doc"));
        assert_eq!(sanitize("/abs/"), None);
        assert_eq!(sanitize(".."), None);
        assert_eq!(sanitize("a/.."), None);
    }

    #[test]
    fn control_and_bidi_characters_are_removed() {
        assert_eq!(sanitize("a\0b\r\n.txt").as_deref(), Some("ab.txt"));
        assert_eq!(
            sanitize("invoice\u{202E}fdp.exe").as_deref(),
            Some("invoicefdp.exe")
        );
        assert_eq!(sanitize("\u{200B}\u{FEFF}"), None);
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary() {
        let long = "é".repeat(300);
        let s = sanitize(&long).unwrap();
        assert!(s.len() <= MAX_LEN);
        assert!(s.chars().all(|c| c == 'é'));
    }
}
