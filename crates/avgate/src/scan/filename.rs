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
    if trimmed.len() <= MAX_LEN {
        return Some(trimmed.to_owned());
    }
    // Too long: cut the stem, keep a short extension, since the extension
    // is what people and tools judge a file by.
    let extension = trimmed
        .rfind('.')
        .map(|dot| &trimmed[dot..])
        .filter(|ext| (2..=MAX_EXTENSION).contains(&ext.len()));
    let extension = extension.unwrap_or("");
    let stem = &trimmed[..trimmed.len() - extension.len()];
    let mut end = MAX_LEN - extension.len();
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}{extension}", &stem[..end]))
}

/// The longest extension (with its dot) kept when a name is cut.
const MAX_EXTENSION: usize = 16;

/// Characters that show nothing, or move text around, and so can disguise
/// an extension: Unicode's format characters (category Cf: bidi controls,
/// zero-width characters, the soft hyphen, tag characters, the BOM), the
/// line and paragraph separators (Zl, Zp), and the blank Hangul fillers
/// and variation selectors used to pad names invisibly.
pub(crate) fn is_invisible_formatting(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                   // soft hyphen
        | '\u{034F}'                 // combining grapheme joiner
        | '\u{0600}'..='\u{0605}'    // Arabic number signs
        | '\u{061C}'                 // Arabic letter mark (bidi)
        | '\u{06DD}' | '\u{070F}' | '\u{0890}'..='\u{0891}' | '\u{08E2}'
        | '\u{115F}' | '\u{1160}'    // Hangul fillers
        | '\u{17B4}' | '\u{17B5}'    // Khmer inherent vowels (invisible)
        | '\u{180B}'..='\u{180F}'    // Mongolian variation selectors, vowel separator
        | '\u{200B}'..='\u{200F}'    // zero-width space/joiners, LRM, RLM
        | '\u{2028}' | '\u{2029}'    // line and paragraph separators
        | '\u{202A}'..='\u{202E}'    // bidi embeddings and overrides
        | '\u{2060}'..='\u{206F}'    // word joiner, invisible operators, bidi isolates
        | '\u{3164}' | '\u{FFA0}'    // Hangul fillers
        | '\u{FE00}'..='\u{FE0F}'    // variation selectors
        | '\u{FEFF}'                 // BOM
        | '\u{FFF9}'..='\u{FFFB}'    // interlinear annotation
        | '\u{110BD}' | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}'  // tags and variation selectors supplement
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
    fn every_invisible_or_reordering_character_is_removed() {
        for c in [
            '\u{00AD}',
            '\u{061C}',
            '\u{200E}',
            '\u{2028}',
            '\u{2029}',
            '\u{2067}',
            '\u{3164}',
            '\u{FE0F}',
            '\u{E0041}',
            '\u{E007F}',
        ] {
            assert_eq!(
                sanitize(&format!("inv{c}oice.pdf")).as_deref(),
                Some("invoice.pdf"),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn a_long_name_keeps_its_extension() {
        let name = format!("{}.exe", "a".repeat(5000));
        let s = sanitize(&name).unwrap();
        assert_eq!(s.len(), MAX_LEN);
        assert!(s.ends_with("aaa.exe"), "{s}");
        // Not an extension: cut like the rest.
        let dotless = "b".repeat(300);
        assert_eq!(sanitize(&dotless).unwrap(), "b".repeat(MAX_LEN));
        let multibyte = format!("{}.pdf", "é".repeat(200));
        let s = sanitize(&multibyte).unwrap();
        assert!(s.len() <= MAX_LEN && s.ends_with("é.pdf"), "{s}");
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary() {
        let long = "é".repeat(300);
        let s = sanitize(&long).unwrap();
        assert!(s.len() <= MAX_LEN);
        assert!(s.chars().all(|c| c == 'é'));
    }
}
