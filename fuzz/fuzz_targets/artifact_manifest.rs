//! Artifact manifests (NUL-separated) parse or are refused without panicking; a parsed one has valid blob digests and rebuilds to a manifest that parses to the same artifact; rank and pick_by_key choose the same artifact whatever the order of the candidates, from among them.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use talaria_artifact::discover::pick_by_key;
use talaria_artifact::format::{
    ArtifactInfo, ArtifactSpec, IndexedLayer, Knobs, Profile, build_manifest, parse_artifact, rank,
};
use talaria_artifact::oci::{self, RawManifest};

fuzz_target!(|data: &[u8]| {
    let mut parsed: Vec<ArtifactInfo> = Vec::new();
    for part in data.split(|&b| b == 0).take(16) {
        let raw = RawManifest::new(Bytes::copy_from_slice(part), None);
        let Ok(a) = parse_artifact(&raw) else {
            continue;
        };
        check_one(&raw, &a);
        parsed.push(a);
    }
    let digests = |v: &[ArtifactInfo]| -> Vec<String> {
        v.iter().map(|a| a.descriptor.digest.clone()).collect()
    };

    let ranked = rank(parsed.clone());
    for a in &ranked {
        assert!(Profile::understood(&a.profile, a.profile_version).is_some());
        assert!(
            parsed
                .iter()
                .any(|p| p.descriptor.digest == a.descriptor.digest)
        );
    }
    let understood = parsed
        .iter()
        .filter(|a| Profile::understood(&a.profile, a.profile_version).is_some())
        .count();
    assert_eq!(ranked.len(), understood, "rank drops only unknown profiles");
    let tier = |a: &ArtifactInfo| match Profile::parse(&a.profile) {
        Ok(p) if p.has_plan() && a.plan.is_some() => usize::from(!a.plan_recorded),
        _ => 2,
    };
    assert!(
        ranked.windows(2).all(|w| tier(&w[0]) <= tier(&w[1])),
        "rank tiers in order"
    );
    let mut reversed = parsed.clone();
    reversed.reverse();
    assert_eq!(
        digests(&rank(reversed.clone())),
        digests(&ranked),
        "rank ignores input order"
    );
    assert_eq!(
        digests(&rank(ranked.clone())),
        digests(&ranked),
        "rank is idempotent"
    );

    for key in parsed
        .iter()
        .map(|a| a.key.clone())
        .take(2)
        .chain(["no-such-key".into()])
    {
        let picked = pick_by_key(parsed.clone(), &key);
        let again = pick_by_key(reversed.clone(), &key);
        assert_eq!(
            picked.as_ref().map(|a| &a.descriptor.digest),
            again.as_ref().map(|a| &a.descriptor.digest),
            "pick_by_key ignores input order"
        );
        match picked {
            Some(p) => {
                assert_eq!(p.key, key);
                // A recorded plan of the key is never passed over for a predicted one.
                let any_recorded = parsed.iter().any(|a| a.key == key && a.plan_recorded);
                assert_eq!(p.plan_recorded, any_recorded);
            }
            None => assert!(parsed.iter().all(|a| a.key != key)),
        }
    }
});

fn check_one(raw: &RawManifest, a: &ArtifactInfo) {
    assert_eq!(a.descriptor.digest, oci::sha256_digest(&raw.bytes));
    assert_eq!(a.descriptor.size, raw.bytes.len() as u64);
    let blobs = a
        .layers
        .iter()
        .flat_map(|l| std::iter::once(&l.index).chain(&l.windows))
        .chain(&a.plan)
        .chain(&a.pack);
    for d in blobs {
        oci::digest_hex(&d.digest).expect("a parsed artifact names valid digests");
        assert!(d.annotations.is_none());
    }
    assert!(!a.plan_recorded || a.plan.is_some());

    // Rebuilt from what was parsed, the manifest parses to the same artifact (the key is
    // computed from knobs, which the manifest does not carry).
    let Some(profile) = Profile::understood(&a.profile, a.profile_version) else {
        return;
    };
    let spec = ArtifactSpec {
        subject: a.subject.clone(),
        profile,
        knobs: &Knobs::default(),
        layers: a.layers.clone(),
        skipped: a.skipped.clone(),
        plan: a.plan.clone(),
        startup_paths: a.startup_paths.clone(),
        plan_recorded: a.plan_recorded,
        pack: a.pack.clone(),
        created: a.created.clone(),
    };
    let rebuilt = build_manifest(spec).expect("a parsed artifact rebuilds");
    let b = parse_artifact(&rebuilt).expect("a rebuilt artifact parses");
    let brief = |l: &IndexedLayer| {
        (
            l.layer_digest.clone(),
            l.index.digest.clone(),
            l.index.size,
            l.windows.as_ref().map(|w| (w.digest.clone(), w.size)),
        )
    };
    let desc = |d: &Option<oci::Descriptor>| {
        d.as_ref()
            .map(|d| (d.media_type.clone(), d.digest.clone(), d.size))
    };
    assert_eq!(
        a.layers.iter().map(brief).collect::<Vec<_>>(),
        b.layers.iter().map(brief).collect::<Vec<_>>()
    );
    assert_eq!(desc(&a.plan), desc(&b.plan));
    assert_eq!(desc(&a.pack), desc(&b.pack));
    assert_eq!(a.subject.digest, b.subject.digest);
    assert_eq!(a.subject.size, b.subject.size);
    assert_eq!(
        (&a.profile, a.profile_version),
        (&b.profile, b.profile_version)
    );
    assert_eq!(a.skipped, b.skipped);
    assert_eq!(a.startup_paths, b.startup_paths);
    assert_eq!(a.created, b.created);
    assert_eq!(a.plan_recorded, b.plan_recorded);
}
