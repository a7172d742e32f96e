//! parse_challenge never panics on any WWW-Authenticate header; what it parses has a non-empty lower-case scheme and lower-case parameter names, and written back as `scheme k="v",...` it parses to the same challenge.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::oci::registry::credentials::parse_challenge;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let Some(c) = parse_challenge(header) else {
        assert!(
            header.trim().is_empty(),
            "only a blank header has no scheme: {header:?}"
        );
        return;
    };
    assert!(!c.scheme.is_empty());
    assert!(!c.scheme.contains(char::is_whitespace));
    assert!(!c.scheme.chars().any(|ch| ch.is_ascii_uppercase()));
    for k in c.params.keys() {
        assert!(!k.is_empty());
        assert!(!k.contains(|ch: char| ch == '=' || ch == ',' || ch.is_whitespace()));
        assert!(!k.chars().any(|ch| ch.is_ascii_uppercase()));
    }
    let params: Vec<String> = c
        .params
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    let written = format!("{} {}", c.scheme, params.join(","));
    assert_eq!(parse_challenge(&written).as_ref(), Some(&c), "{written:?}");
});
