//! ImageRef::parse never panics; a parsed reference has a registry, a repository, a valid sha256 digest if any, and written back as `registry/name[:tag][@digest]` parses to the same reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::oci;
use talaria_artifact::oci::registry::ImageRef;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(r) = ImageRef::parse(s) else {
        return;
    };
    assert!(!r.repository.registry.is_empty());
    assert!(!r.repository.name.is_empty());
    assert!(!r.repository.name.starts_with('/') && !r.repository.name.ends_with('/'));
    if let Some(d) = &r.digest {
        oci::digest_hex(d).expect("a parsed digest is a valid sha256 digest");
        assert_eq!(r.reference(), *d);
    } else {
        assert_eq!(
            Some(r.reference()),
            r.tag.clone(),
            "without a digest, a tag"
        );
    }
    // `ImageRef::parse` refuses upper-case repository names (containerd would read an
    // upper-case first component as a registry host).
    assert!(!r.repository.name.chars().any(|c| c.is_ascii_uppercase()));
    let mut written = r.repository.to_string();
    if let Some(t) = &r.tag {
        written = format!("{written}:{t}");
    }
    if let Some(d) = &r.digest {
        written = format!("{written}@{d}");
    }
    let again = ImageRef::parse(&written).expect("a written reference parses");
    assert_eq!(again, r, "{s:?} written as {written:?}");
});
