//! Scanning through avgate against a real clamd: verdicts, input handling,
//! limits.

mod common;

use common::*;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eicar_is_found_and_a_clean_file_is_ok() {
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;

    let (status, body) = gw.scan("eicar.com", EICAR.to_vec()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["filename"], "eicar.com");
    assert_eq!(body["status"], "FOUND");
    assert_eq!(body["verdict"], "infected");
    assert!(
        body["signature"].as_str().unwrap().contains("Eicar"),
        "{body}"
    );
    assert_eq!(body["score"], 100);
    assert_eq!(body["size"], EICAR.len());
    assert_eq!(
        body["sha256"],
        "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
    );
    assert_eq!(body["engine"]["name"], "clamav");
    assert!(body["engine"]["version"]
        .as_str()
        .unwrap()
        .starts_with("ClamAV 1."));

    let (status, body) = gw.scan("hello.txt", b"hello, world\n".to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "OK");
    assert_eq!(body["verdict"], "clean");
    assert_eq!(body["signature"], serde_json::Value::Null);
    assert_eq!(body["score"], 0);
    assert!(body["duration_ms"].is_u64());

    // As curl shows it: JSON, ending with a newline (the prompt after it
    // starts on its own line), for answers and errors alike.
    for (path, ct, data) in [
        ("/v1/scan/raw", "application/octet-stream", &b"hello"[..]),
        ("/v1/scan/raw", "text/plain", &b"hello"[..]),
    ] {
        let r = gw
            .client
            .post(gw.url(path))
            .header("content-type", ct)
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], "application/json");
        let text = r.text().await.unwrap();
        assert!(text.starts_with('{') && text.ends_with("}\n"), "{text:?}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_clamav_testfile_is_found_as_clamdscan_finds_it() {
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let files: Vec<_> = std::fs::read_dir(TESTFILES)
        .expect("clamav-testfiles is installed (scripts/setup.sh)")
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 40, "only {} test files", files.len());

    // What clamdscan says on the same clamd.
    let out = std::process::Command::new("clamdscan")
        .arg("--config-file")
        .arg(clamd.clamdscan_conf())
        .args(["--stream", "--no-summary"])
        .args(&files)
        .output()
        .expect("clamdscan runs");
    let report = String::from_utf8_lossy(&out.stdout);

    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        let expected = report
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{}: ", path.display()))
                    .and_then(|rest| rest.strip_suffix(" FOUND"))
            })
            .unwrap_or_else(|| panic!("clamdscan did not find {name}: {report}"));
        let (status, body) = gw.scan(name, std::fs::read(path).unwrap()).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["status"], "FOUND", "{name}: {body}");
        assert_eq!(body["signature"], expected, "{name}");
        assert_eq!(body["filename"], name);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_body_and_batch_endpoints() {
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;

    // Raw body, name in a header.
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .header("content-type", "application/octet-stream")
        .header("x-filename", "sub/dir/clam.zip")
        .body(std::fs::read(format!("{TESTFILES}/clam.zip")).unwrap())
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-request-id"));
    let (status, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["filename"], "clam.zip");
    assert_eq!(body["status"], "FOUND");

    // Raw body, name in the query string, no content type.
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw?filename=notes%20v2.txt"))
        .body("just text")
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["filename"], "notes v2.txt");
    assert_eq!(body["status"], "OK");

    // Batch: one result per file, worst status on top.
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"clean".to_vec()).file_name("a.txt"),
        )
        .part(
            "file",
            reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("b.com"),
        )
        .text("comment", "ignored");
    let r = gw
        .client
        .post(gw.url("/v1/scan/batch"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["filename"], "a.txt");
    assert_eq!(results[0]["status"], "OK");
    assert_eq!(results[1]["status"], "FOUND");

    // The legacy path answers like /v1/scan.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(EICAR.to_vec()).file_name("e.com"),
    );
    let r = gw
        .client
        .post(gw.url("/scan"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("FOUND")));
    gw.stop().await;
}

/// Bodies that two multipart parsers can read differently are how a
/// scan is got round when the application behind avgate parses the same
/// request again: avgate would scan a decoy while the application stores
/// EICAR. Each case below is read that way by some parser in use (first
/// or last of two parameters or headers, parameter names with case,
/// RFC 2231 names, backslash escapes, a second boundary, a part cut by
/// its own boundary). Every one is refused, on both form routes, and a
/// correct reading of a tricky but unambiguous body finds the EICAR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_bodies_that_parsers_read_differently_are_refused() {
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let eicar = String::from_utf8(EICAR.to_vec()).unwrap();
    let part = |headers: &str, content: &str| format!("--B\r\n{headers}\r\n\r\n{content}\r\n");
    let cd = |params: &str| format!("Content-Disposition: form-data; {params}");
    let ct = "multipart/form-data; boundary=B";
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "two name parameters",
            ct,
            part(&cd(r#"name="decoy"; name="file"; filename="a""#), &eicar)
                + &part(&cd(r#"name="file"; name="decoy"; filename="b""#), "clean")
                + "--B--\r\n",
        ),
        (
            "a name parameter in capitals",
            ct,
            part(&cd(r#"name="file"; filename="a""#), "clean")
                + &part(&cd(r#"NAME="decoy"; name="file""#), &eicar)
                + "--B--\r\n",
        ),
        (
            "two Content-Disposition headers",
            ct,
            part(
                &(cd(r#"name="file"; filename="a""#) + "\r\n" + &cd(r#"name="decoy""#)),
                &eicar,
            ) + &part(&cd(r#"name="file"; filename="b""#), "clean")
                + "--B--\r\n",
        ),
        (
            "two Content-Transfer-Encoding headers",
            ct,
            part(
                &(cd(r#"name="file"; filename="a""#)
                    + "\r\nContent-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: binary"),
                "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=",
            ) + "--B--\r\n",
        ),
        (
            "name* (RFC 2231)",
            ct,
            part(&cd(r#"name="file"; filename="a""#), "clean")
                + &part(&cd("name*=UTF-8''file"), &eicar)
                + "--B--\r\n",
        ),
        (
            "a backslash before a quote",
            ct,
            part(&cd(r#"name="file"; filename="a""#), "clean")
                + &part(&cd(r#"name="decoy"; filename="\"; name=\"file""#), &eicar)
                + "--B--\r\n",
        ),
        (
            "two boundary parameters",
            "multipart/form-data; boundary=A; boundary=B",
            format!("--A\r\n{}\r\n\r\nclean\r\n--A--\r\n", cd(r#"name="file""#))
                + &part(&cd(r#"name="file""#), &eicar)
                + "--B--\r\n",
        ),
        (
            "text after the closing boundary",
            ct,
            part(&cd(r#"name="file"; filename="a""#), "clean") + "--B--" + &eicar + "\r\n",
        ),
        (
            "the boundary inside a part",
            ct,
            part(&cd(r#"name="file"; filename="a""#), &format!("clean\r\n--Bx{eicar}"))
                + "--B--\r\n",
        ),
        (
            "a bare LF before the first boundary",
            ct,
            "\n".to_owned()
                + &part(&cd(r#"name="file"; filename="evil""#), &eicar)
                + &part(&cd(r#"name="file"; filename="clean""#), "clean")
                + "--B--\r\n",
        ),
        (
            "a part after the closing boundary",
            ct,
            part(&cd(r#"name="file"; filename="clean""#), "clean")
                + "--B--\r\n"
                + &part(&cd(r#"name="file"; filename="evil""#), &eicar)
                + "--B--\r\n",
        ),
        (
            "a part hidden in a text field behind a bare LF",
            ct,
            part(
                &cd(r#"name="note""#),
                &format!("x\n--B\r\n{}\r\n\r\n{eicar}", cd(r#"name="file"; filename="evil""#)),
            ) + &part(&cd(r#"name="file"; filename="clean""#), "clean")
                + "--B--\r\n",
        ),
        (
            "a file cut short by a bare LF boundary",
            ct,
            part(
                &cd(r#"name="file"; filename="evil""#),
                &format!("{eicar}\n--B\r\n{}\r\n\r\npad", cd(r#"name="pad""#)),
            ) + "--B--\r\n",
        ),
        (
            "a name PHP reads as file",
            ct,
            part(&cd(r#"name="file"; filename="clean""#), "clean")
                + &part(&cd(r#"name=" file"; filename="evil""#), &eicar)
                + "--B--\r\n",
        ),
        (
            "a name PHP reads as an array of files",
            ct,
            part(&cd(r#"name="file"; filename="clean""#), "clean")
                + &part(&cd(r#"name="file[]"; filename="evil""#), &eicar)
                + "--B--\r\n",
        ),
        (
            "an unquoted boundary that Werkzeug ends at a parenthesis",
            "multipart/form-data; boundary=B(x)",
            format!("--B(x)\r\n{}\r\n\r\nhello\r\n", cd(r#"name="file"; filename="a""#))
                + &part(&cd(r#"name="file"; filename="evil""#), &eicar)
                + "--B--\r\n\r\n--B(x)--\r\n",
        ),
        (
            "an unquoted name that Werkzeug cuts to file",
            ct,
            part(&cd(r#"name=file(x); filename="evil""#), &eicar)
                + &part(&cd(r#"name="file"; filename="clean""#), "clean")
                + "--B--\r\n",
        ),
        (
            "a name that Werkzeug unescapes to file",
            ct,
            part(&cd(r#"name="fi\le"; filename="evil""#), &eicar)
                + &part(&cd(r#"name="file"; filename="clean""#), "clean")
                + "--B--\r\n",
        ),
        (
            "a name Django strips to file",
            ct,
            part(&cd(r#"name="file"; filename="clean""#), "clean")
                + &part(&cd("name=file\u{a0}; filename=\"evil\""), &eicar)
                + "--B--\r\n",
        ),
        (
            "a file part that busboy decodes from UTF-16",
            ct,
            part(
                &(cd(r#"name="file""#) + "\r\nContent-Type: text/plain; charset=utf-16le"),
                &eicar,
            ) + "--B--\r\n",
        ),
        (
            "a folded header line",
            ct,
            part("Content-Disposition: form-data; name=\"decoy\";\r\n name=\"file\"", &eicar)
                + "--B--\r\n",
        ),
    ];
    for (what, content_type, body) in cases {
        for path in ["/v1/scan", "/v1/scan/batch"] {
            let (status, json) = gw
                .post_raw(path, content_type, body.clone().into_bytes())
                .await;
            let code = json["error"]["code"].as_str().unwrap_or("");
            assert!(
                status == 400 && ["invalid_multipart", "invalid_content_type"].contains(&code),
                "{what} on {path}: {status} {json}"
            );
        }
    }

    // "name=" inside another parameter's quoted value is part of that
    // value: the part named "file" is the EICAR one, and is found.
    let body = part(&cd(r#"filename="x; name=file;"; name="decoy""#), "clean")
        + &part(&cd(r#"filename="x; name=decoy;"; name="file""#), &eicar)
        + "--B--\r\n";
    let (status, json) = gw.post_raw("/v1/scan", ct, body.into_bytes()).await;
    assert_eq!(
        (status, json["status"].as_str()),
        (200, Some("FOUND")),
        "{json}"
    );
    assert_eq!(json["filename"], "x; name=decoy;", "{json}");

    // What .NET's MultipartFormDataContent sends with every file
    // (filename* beside filename, unquoted values) is read.
    let body = part(
        &(cd("name=file; filename=eicar.com; filename*=utf-8''eicar.com")
            + "\r\nContent-Type: application/octet-stream"),
        &eicar,
    ) + "--B--\r\n";
    let (status, json) = gw.post_raw("/v1/scan", ct, body.into_bytes()).await;
    assert_eq!(
        (status, json["status"].as_str()),
        (200, Some("FOUND")),
        "{json}"
    );
    assert_eq!(json["filename"], "eicar.com", "{json}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_one_json_error_shape() {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.max_parts = 4;
    let gw = Gateway::start(cfg).await;
    let b = "XyZzY";
    let mp = format!("multipart/form-data; boundary={b}");

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/scan",
            "application/json",
            b"{}".to_vec(),
            400,
            "invalid_content_type",
        ),
        (
            "/v1/scan",
            "multipart/form-data",
            b"x".to_vec(),
            400,
            "invalid_content_type",
        ),
        (
            "/v1/scan",
            &mp,
            b"this is not multipart at all".to_vec(),
            400,
            "invalid_multipart",
        ),
        (
            "/v1/scan",
            &mp,
            // Truncated: no closing boundary.
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc"
            )
            .into_bytes(),
            400,
            "invalid_multipart",
        ),
        (
            "/v1/scan",
            &mp,
            multipart_body(b, &[("other", None, &b"x"[..])]),
            400,
            "missing_file",
        ),
        (
            "/v1/scan",
            &mp,
            multipart_body(
                b,
                &[
                    ("file", Some(&b"a"[..]), &b"1"[..]),
                    ("file", Some(&b"b"[..]), &b"2"[..]),
                ],
            ),
            400,
            "too_many_files",
        ),
        (
            "/v1/scan/batch",
            &mp,
            multipart_body(b, &[("x", None, &b"1"[..]); 5]),
            400,
            "too_many_parts",
        ),
        (
            "/v1/scan/raw",
            "multipart/form-data; boundary=x",
            b"x".to_vec(),
            400,
            "invalid_content_type",
        ),
        (
            "/v1/scan",
            &mp,
            // A form field past max_field_size (64 KiB).
            multipart_body(
                b,
                &[
                    ("note", None, &[b'x'; 70_000][..]),
                    ("file", Some(&b"a"[..]), &b"1"[..]),
                ],
            ),
            413,
            "field_too_large",
        ),
        (
            "/v1/scan",
            &mp,
            // An encoded file part would be scanned as its encoding.
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"e.com\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n\
                 WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=\r\n--{b}--\r\n"
            )
            .into_bytes(),
            400,
            "invalid_multipart",
        ),
        ("/v1/nope", "text/plain", b"".to_vec(), 404, "not_found"),
    ];
    for (path, ct, body, want_status, want_code) in cases {
        let (status, json) = gw.post_raw(path, ct, body).await;
        assert_eq!(status, want_status, "{path} {ct}: {json}");
        assert_eq!(json["status"], "ERROR", "{json}");
        assert_eq!(json["error"]["code"], want_code, "{path} {ct}: {json}");
        assert!(json["error"]["message"].as_str().unwrap().len() > 5);
    }
    let r = gw.client.get(gw.url("/v1/scan")).send().await.unwrap();
    assert_error(&json(r).await, 405, "method_not_allowed");

    // Encoded bodies would be scanned as sent and stored decoded by
    // whoever decodes them (clamd does not unpack deflate): refused.
    let form = multipart_body(b, &[("file", Some(&b"a"[..]), EICAR)]);
    let raw = |path: &str, ct: &str, coding: &str, body: &[u8]| {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ct}\r\n{coding}\r\n"
        );
        if !coding.starts_with("Transfer-Encoding") {
            request += &format!("Content-Length: {}\r\n", body.len());
        }
        request + "\r\n"
    };
    for (path, ct, coding, body) in [
        (
            "/v1/scan/raw",
            "application/octet-stream",
            "Content-Encoding: deflate",
            EICAR.to_vec(),
        ),
        (
            "/v1/scan",
            mp.as_str(),
            "Content-Encoding: gzip",
            form.clone(),
        ),
        (
            "/v1/scan/batch",
            mp.as_str(),
            "Content-Encoding: identity, br",
            form.clone(),
        ),
        (
            "/v1/scan/raw",
            "application/octet-stream",
            "Transfer-Encoding: gzip, chunked",
            chunked(EICAR),
        ),
    ] {
        let answer = send_all_then_read(gw.addr, &raw(path, ct, coding, &body), &body)
            .await
            .unwrap();
        assert_raw_error(&answer, 415, "unsupported_encoding");
    }
    // Two Content-Types: a form that is a clean file at the first
    // boundary and EICAR at the second, which servers that keep the last
    // header (gunicorn) or join them (Werkzeug) read. Refused, on every
    // endpoint.
    let inner = multipart_body("BBB", &[("file", Some(&b"e.com"[..]), EICAR)]);
    let two_forms = multipart_body(
        "AAA",
        &[
            ("file", Some(&b"a.txt"[..]), &b"hello"[..]),
            ("note", None, &inner[..]),
        ],
    );
    for (path, first) in [
        ("/v1/scan", "multipart/form-data; boundary=AAA"),
        ("/v1/scan/batch", "multipart/form-data; boundary=AAA"),
        ("/scan", "multipart/form-data; boundary=AAA"),
        ("/v1/scan/raw", "application/octet-stream"),
    ] {
        let head = raw(
            path,
            first,
            "Content-Type: multipart/form-data; boundary=BBB",
            &two_forms,
        );
        let answer = send_all_then_read(gw.addr, &head, &two_forms)
            .await
            .unwrap();
        assert_raw_error(&answer, 400, "invalid_content_type");
    }
    let identity = raw(
        "/v1/scan/raw",
        "application/octet-stream",
        "Content-Encoding: identity",
        EICAR,
    );
    let answer = send_all_then_read(gw.addr, &identity, EICAR).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200 ") && answer.contains("\"FOUND\""),
        "{answer}"
    );

    // The encoded part's error names the file, as errors about a file do.
    let encoded = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"e.com\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n--{b}--\r\n"
    );
    let (_, refused) = gw.post_raw("/v1/scan", &mp, encoded.into_bytes()).await;
    assert_eq!(refused["filename"], "e.com", "{refused}");

    // "binary" (no encoding at all) is fine.
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"e.com\"\r\n\
         Content-Transfer-Encoding: binary\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(EICAR);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    let (status, found) = gw.post_raw("/v1/scan", &mp, body).await;
    assert_eq!(
        (status, found["status"].as_str()),
        (200, Some("FOUND")),
        "{found}"
    );

    // A batch that says it is larger than 16 files of max_size: refused
    // from its head, before any of it is sent.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/scan/batch HTTP/1.1\r\nHost: x\r\nContent-Type: {mp}\r\n\
         Content-Length: 99999999999\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"code\"") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    assert_raw_error(&String::from_utf8_lossy(&answer), 413, "request_too_large");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_short_is_invalid_never_scanned_as_it_stands() {
    // What arrived (clean data) would scan OK; but it is not the file the
    // client meant to send, so it must not get a verdict.
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let data = random_bytes(500, 41);
    let raw = "POST /v1/scan/raw?filename=a.bin HTTP/1.1\r\nHost: x\r\n\
               Content-Type: application/octet-stream\r\n";
    let form = multipart_body("XX", &[("file", Some(&b"a.bin"[..]), &data)]);
    let multipart = "POST /v1/scan HTTP/1.1\r\nHost: x\r\n\
                     Content-Type: multipart/form-data; boundary=XX\r\n";
    let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
    chunk.extend_from_slice(&data);
    chunk.extend_from_slice(b"\r\n");
    let cases = [
        // Content-Length promises more than comes.
        (format!("{raw}Content-Length: 1000\r\n\r\n"), data.clone()),
        // Chunked, without the last chunk.
        (
            format!("{raw}Transfer-Encoding: chunked\r\n\r\n"),
            chunk.clone(),
        ),
        // A complete form, but less than its Content-Length.
        (
            format!("{multipart}Content-Length: {}\r\n\r\n", form.len() + 100),
            form.clone(),
        ),
        // A form cut off inside the file part.
        (
            format!("{multipart}Content-Length: {}\r\n\r\n", form.len()),
            form[..form.len() - 40].to_vec(),
        ),
    ];
    for (head, body) in cases {
        let answer = send_cut_short_then_read(gw.addr, &head, &body)
            .await
            .unwrap();
        assert_raw_error(&answer, 400, "invalid_body");
        assert!(!answer.contains("\"OK\""), "{head}: {answer}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_filenames_are_sanitized_or_refused_never_echoed() {
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let b = "BoUnDaRy";
    let mp = format!("multipart/form-data; boundary={b}");
    let long = "A".repeat(10_000);
    let cases: Vec<(&[u8], Option<&str>)> = vec![
        (b"../../etc/passwd", Some("passwd")),
        (b"..\\..\\windows\\evil.exe", Some("evil.exe")),
        ("invoice\u{202E}fdp.exe".as_bytes(), Some("invoicefdp.exe")),
        (b"..", None),
        // Control characters: refused by the part-header parser, or dropped.
        (b"a\x01b\x1f.txt", None),
        (long.as_bytes(), Some(&long[..255])),
        (b"\xff\xfe bad utf8", None),
        (b"nul\x00byte.txt", None),
    ];
    for (raw, want) in cases {
        let body = multipart_body(b, &[("file", Some(raw), EICAR)]);
        let (status, json) = gw.post_raw("/v1/scan", &mp, body).await;
        let shown = String::from_utf8_lossy(raw);
        match status {
            200 => {
                assert_eq!(json["status"], "FOUND", "{shown}: {json}");
                let got = json["filename"].as_str();
                if want.is_some() {
                    assert_eq!(got, want, "{shown}");
                }
                if let Some(got) = got {
                    assert!(!got.contains(['/', '\\', '\0', '\u{202E}']), "{got:?}");
                    assert!(!got.chars().any(char::is_control), "{got:?}");
                    assert!(got.len() <= 255);
                }
            }
            400 => {
                assert!(want.is_none(), "{shown}: refused but should pass: {json}");
                assert_eq!(json["status"], "ERROR");
            }
            other => panic!("{shown}: HTTP {other}: {json}"),
        }
    }
    // Raw endpoint: the header name is sanitized the same way.
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .header("x-filename", "/etc/shadow")
        .body(EICAR.to_vec())
        .send()
        .await
        .unwrap();
    let (_, json) = json(r).await;
    assert_eq!(json["filename"], "shadow");
    gw.stop().await;
}

/// `sha256` and `size` cover every byte, in order, however the upload
/// arrives: pieces far smaller and far larger than what avgate hands clamd
/// at a time, as one multipart form and as a raw chunked stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_and_size_cover_every_byte_however_it_arrives() {
    use sha2::{Digest, Sha256};
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let data = random_bytes((5 << 20) + 12_345, 31);
    let expected = hex::encode(Sha256::digest(&data));

    let (status, body) = gw.scan("five.bin", data.clone()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("OK")),
        "{body}"
    );
    assert_eq!(body["sha256"], expected);
    assert_eq!(body["size"], data.len());

    let sizes = [1, 1000, 70_000, 200_000, 65_536, 3];
    let mut pieces = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at == data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        pieces.push(Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(
            &data[at..end],
        )));
        at = end;
    }
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .header("x-filename", "five.bin")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("OK")),
        "{body}"
    );
    assert_eq!(body["sha256"], expected);
    assert_eq!(body["size"], data.len());
    gw.stop().await;
}

/// avgate in front of a real clamd, with `max_size` at 1 MiB. The clamd
/// lives as long as the first value.
async fn gateway_with_1_mib_limit() -> (Clamd, Gateway) {
    let clamd = Clamd::start("");
    let mut cfg = config(&[clamd.address()]);
    cfg.max_size = mib(1);
    let gw = Gateway::start(cfg).await;
    (clamd, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_limit_get_413_early() {
    let (_clamd, gw) = gateway_with_1_mib_limit().await;

    // Exactly at the limit is fine.
    let (status, body) = gw.scan("max.bin", random_bytes(1 << 20, 7)).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("OK")),
        "{body}"
    );

    // One byte over, multipart.
    let (status, body) = gw.scan("big.bin", random_bytes((1 << 20) + 1, 8)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "file_too_large");

    // Raw with a Content-Length over the limit: refused before the body.
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .body(random_bytes(3 << 20, 9))
        .send()
        .await
        .unwrap();
    assert_error(&json(r).await, 413, "file_too_large");

    // Raw, chunked (no Content-Length), a stream that would never end: 413
    // once it crosses the limit, while the client is still sending (avgate
    // drains the rest until it stops, see the tests below).
    let endless = futures_util::stream::iter(0u64..)
        .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(random_bytes(64 * 1024, i + 1))));
    let r = gw
        .client
        .post(gw.url("/v1/scan/raw"))
        .body(reqwest::Body::wrap_stream(endless))
        .send()
        .await
        .expect("the 413 arrives while the client still sends");
    assert_error(&json(r).await, 413, "file_too_large");
    gw.stop().await;
}

/// avgate answers 413 before reading an upload it refuses. A client that
/// sends everything before it reads must still get that answer, not a
/// reset: avgate reads and discards the rest (a "lingering close").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_everything_before_reading_gets_the_413() {
    let (_clamd, gw) = gateway_with_1_mib_limit().await;
    let upload = random_bytes(32 << 20, 11);

    // Refused on its Content-Length, before a byte of the body is read.
    let head = format!(
        "POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         X-Filename: big.bin\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    );
    let answer = send_all_then_read(gw.addr, &head, &upload)
        .await
        .expect("the connection stays up until the answer is read");
    assert_raw_error(&answer, 413, "file_too_large");

    // Refused in the middle of a multipart stream that has no length.
    let form = multipart_body("big-b", &[("file", Some(b"big.bin"), &upload)]);
    let head = "POST /v1/scan HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Type: multipart/form-data; boundary=big-b\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    let answer = send_all_then_read(gw.addr, head, &chunked(&form))
        .await
        .expect("the connection stays up until the answer is read");
    assert_raw_error(&answer, 413, "file_too_large");

    // The connection is still usable when the client keeps it.
    let keep = head.replace("Connection: close\r\n", "");
    let mut twice = chunked(&form);
    twice.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let answer = send_all_then_read(gw.addr, &keep, &twice).await.unwrap();
    assert_raw_error(&answer, 413, "file_too_large");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 1, "{answer}");
    gw.stop().await;
}

/// Over HTTP/2 (what Go, curl and browsers speak over TLS), an answer
/// given before the upload is read arrives as that answer, not as a stream
/// error: the rest of the stream is refused with NO_ERROR, which tells the
/// client to stop sending, once the answer is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_early_answers_not_stream_errors() {
    let (_clamd, gw) = gateway_with_1_mib_limit().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    // Refused on its Content-Length, before the body is read.
    let r = h2
        .post(gw.url("/v1/scan/raw"))
        .body(random_bytes(8 << 20, 41))
        .send()
        .await
        .expect("the 413, not a stream error");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_error(&json(r).await, 413, "file_too_large");

    // Refused in the middle of a stream without a length.
    let pieces = (0..128u64)
        .map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(random_bytes(64 * 1024, i + 100))));
    let r = h2
        .post(gw.url("/v1/scan/raw"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .expect("the 413, not a stream error");
    assert_error(&json(r).await, 413, "file_too_large");

    // The connection still serves.
    let r = h2.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    gw.stop().await;
}

/// What a strict HTTP/2 peer (nginx, Envoy in front of avgate) sees when
/// avgate answers before reading the upload: the whole answer, and then
/// the stream refused with NO_ERROR ("stop sending, the answer is
/// complete"), not CANCEL, which such peers treat as a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_answered_early_end_with_no_error() {
    let (_clamd, gw) = gateway_with_1_mib_limit().await;

    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = axum::http::Request::post(format!("http://{}/v1/scan/raw", gw.addr))
        .header("content-length", (8u64 << 20).to_string())
        .body(())
        .unwrap();
    // The upload stays open: avgate refuses it on its length alone.
    let (response, mut upload) = client.send_request(request, false).unwrap();

    let response = response.await.expect("the answer");
    assert_eq!(response.status(), 413);
    let mut body = response.into_body();
    let mut answer = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the whole answer, not a reset");
        let _ = body.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("\"file_too_large\""), "{answer}");

    let reason = std::future::poll_fn(|cx| upload.poll_reset(cx))
        .await
        .unwrap();
    assert_eq!(reason, h2::Reason::NO_ERROR);
    gw.stop().await;
}

/// A client that asks `Expect: 100-continue` is never asked for a body
/// avgate refuses: it gets the 413 first and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_the_413_without_sending_the_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_clamd, gw) = gateway_with_1_mib_limit().await;

    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
              Content-Length: 33554432\r\n\r\n",
        )
        .await
        .unwrap();
    // avgate answers and closes at once: it does not wait for a body it
    // never asked for (as lingering would, until the client goes silent).
    let mut answer = Vec::new();
    let wait = avgate::http::linger::LINGER_READ_TIMEOUT / 2;
    tokio::time::timeout(wait, stream.read_to_end(&mut answer))
        .await
        .expect("answered and closed at once, not after a wait for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_raw_error(&answer, 413, "file_too_large");
    assert!(!answer.contains("100 Continue"), "{answer}");
    gw.stop().await;
}

/// Stopping avgate does not wait for a refused upload that never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_refused_upload_to_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_clamd, gw) = gateway_with_1_mib_limit().await;

    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /v1/scan/raw HTTP/1.1\r\nHost: x\r\n\
              Content-Length: 1099511627776\r\n\r\n",
        )
        .await
        .unwrap();
    // Sends until the connection is closed under it.
    let sender = tokio::spawn(async move {
        let chunk = random_bytes(64 * 1024, 12);
        let mut sent = 0u64;
        while writer.write_all(&chunk).await.is_ok() {
            sent += chunk.len() as u64;
        }
        sent
    });
    let mut head = [0u8; 12];
    reader.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    // Answered, and still reading: the client is not reset mid-send.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sender.is_finished(),
        "the connection was closed under the client"
    );

    let started = Instant::now();
    gw.stop().await;
    let stopped_in = started.elapsed();
    assert!(
        stopped_in < avgate::http::linger::LINGER_TIME / 2,
        "stopping took {stopped_in:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the connection was closed at shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_clamd_cannot_fully_scan_are_never_ok() {
    // clamd's own limits below avgate's: a 2 MiB file passes avgate's
    // limit but exceeds clamd's MaxFileSize.
    let clamd = Clamd::start("MaxFileSize 1M\nMaxScanSize 1M\n");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let (status, body) = gw.scan("big.bin", random_bytes(2 << 20, 3)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["verdict"], "unscannable");
    assert!(
        body["signature"]
            .as_str()
            .unwrap()
            .starts_with("Heuristics.Limits.Exceeded."),
        "{body}"
    );
    assert_eq!(body["score"], 50);

    // An encrypted archive cannot be looked into.
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner.txt");
    std::fs::write(&inner, b"secret content").unwrap();
    let zip = dir.path().join("enc.zip");
    let ok = std::process::Command::new("zip")
        .current_dir(dir.path())
        .args(["-q", "-P", "pw", "enc.zip", "inner.txt"])
        .status()
        .expect("zip is installed (scripts/setup.sh)");
    assert!(ok.success());
    let (status, body) = gw.scan("enc.zip", std::fs::read(&zip).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["verdict"], "unscannable");
    assert!(body["signature"]
        .as_str()
        .unwrap()
        .starts_with("Heuristics.Encrypted."));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_a_known_stream_max_length_is_not_sent_and_not_ok() {
    let clamd = Clamd::start("StreamMaxLength 1M\n");
    let mut cfg = config(&[clamd.address()]);
    cfg.clamd.stream_max_length = Some(mib(1));
    let gw = Gateway::start(cfg).await;
    let (status, body) = gw.scan("big.bin", random_bytes(3 << 20, 4)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND");
    assert_eq!(body["verdict"], "unscannable");
    assert_eq!(body["signature"], "avgate.Limits.Exceeded.StreamMaxLength");
    assert_eq!(body["size"], 3 << 20, "the whole upload was still hashed");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamd_cutting_a_stream_at_its_limit_is_not_ok() {
    // avgate does not know this clamd's StreamMaxLength: clamd cuts the
    // stream off, and its reply must still be read and reported.
    let clamd = Clamd::start("StreamMaxLength 1M\n");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let (status, body) = gw.scan("big.bin", random_bytes(4 << 20, 5)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FOUND", "{body}");
    assert_eq!(body["verdict"], "unscannable");
    gw.stop().await;
}

/// A file held whole (up to `small_file_max_size`) goes to clamd in one
/// write on a session; over TCP, past its StreamMaxLength, clamd answers
/// and closes before the write is done. Its answer is still read: the
/// file is unscannable, and the backend, which did nothing wrong, stays
/// in rotation (anyone who can upload could take it out otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clamd_cutting_a_held_file_at_its_limit_is_not_ok_and_stays_in_rotation() {
    let port = free_port();
    let clamd = Clamd::start(&format!(
        "StreamMaxLength 300K\nTCPSocket {port}\nTCPAddr 127.0.0.1\n"
    ));
    let mut cfg = config(&[format!("tcp://127.0.0.1:{port}")]);
    cfg.replay_buffer = mib(8);
    cfg.clamd.small_file_max_size = mib(8);
    let gw = Gateway::start(cfg).await;
    for seed in 0..3 {
        let (status, body) = gw.scan("big.bin", random_bytes(6 << 20, 60 + seed)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "FOUND", "{body}");
        assert_eq!(body["verdict"], "unscannable", "{body}");
        let (status, ready) = gw.readyz().await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(ready["backends"][0]["state"], "up", "{ready}");
    }
    drop(clamd);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_version_endpoints() {
    let clamd = Clamd::start("");
    let gw = Gateway::start(config(&[clamd.address()])).await;
    let r = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(json(r).await, (200, serde_json::json!({"status": "alive"})));
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["backends"][0]["state"], "up");
    let (status, v) = json(gw.client.get(gw.url("/version")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["avgate"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["database"], "external");
    assert!(v["backends"][0]["clamav"]
        .as_str()
        .unwrap()
        .starts_with("1."));
    gw.stop().await;
}
