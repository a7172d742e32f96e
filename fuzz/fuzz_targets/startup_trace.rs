//! A startup trace (JSON) parses and checks or is refused without panicking, round-trips through its JSON, and against a real layer index becomes an analysis of in-file ranges and a plan that names existing spans within its budget.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use talaria_artifact::index::LayerIndex;
use talaria_artifact::startup::trace::{MAX_RANGES_PER_FILE, MAX_TRACE_FILES, add_range};
use talaria_artifact::startup::{
    ByteRange, PlanOptions, StartupTrace, analysis_from_trace, build_plan,
};
use talaria_artifact_fuzz::{TRACE_LAYER, TRACE_UNINDEXED, sample_index};

fn index() -> &'static LayerIndex {
    static IX: OnceLock<LayerIndex> = OnceLock::new();
    IX.get_or_init(|| sample_index(1024))
}

fuzz_target!(|data: &[u8]| {
    let Ok(t) = StartupTrace::from_json(data) else {
        return;
    };
    assert!(t.files() <= MAX_TRACE_FILES);
    let again = StartupTrace::from_json(&serde_json::to_vec(&t).expect("serializes"))
        .expect("serialized trace parses");
    assert!(again == t, "trace JSON round trip");
    let _ = t.bytes();

    // Merging any file's ranges keeps them sorted, disjoint, bounded and covering.
    for f in t.layers.iter().flat_map(|l| &l.files) {
        let mut merged: Vec<ByteRange> = Vec::new();
        for r in &f.ranges {
            add_range(&mut merged, r.offset, r.len);
        }
        assert!(merged.len() <= MAX_RANGES_PER_FILE);
        assert!(merged.iter().all(|r| r.len > 0));
        assert!(
            merged
                .windows(2)
                .all(|w| w[0].offset.saturating_add(w[0].len) < w[1].offset),
            "merged ranges overlap or touch: {merged:?}"
        );
        for r in f.ranges.iter().filter(|r| r.len > 0) {
            let end = r.offset.saturating_add(r.len);
            assert!(
                merged
                    .iter()
                    .any(|m| m.offset <= r.offset && end <= m.offset.saturating_add(m.len)),
                "{r:?} not covered by {merged:?}"
            );
        }
    }

    let ix = index();
    let digests = vec![TRACE_LAYER.to_string(), TRACE_UNINDEXED.to_string()];
    let layers = [Some(ix), None];
    let analysis = analysis_from_trace(&t, &digests, &layers);
    for f in &analysis.files {
        assert_eq!(f.layer, 0, "only the indexed layer has files");
        let entry = ix.find(&f.path).expect("an analysed file is in the index");
        assert_eq!((f.size, f.data_offset), (entry.size, entry.offset));
        assert!(!f.ranges.is_empty());
        for r in &f.ranges {
            assert!(
                r.len > 0 && r.offset < f.size && r.offset + r.len <= f.size,
                "{r:?}"
            );
        }
    }
    for budget in [0, 4096, u64::MAX] {
        let plan = build_plan(
            &analysis,
            &layers,
            &PlanOptions {
                profile: "startup-local-v1".into(),
                version: 1,
                budget,
            },
        );
        let mut used = std::collections::HashSet::new();
        for e in &plan.entries {
            assert_eq!(e.layer, 0);
            assert!(!e.spans.is_empty());
            for &s in &e.spans {
                assert!(
                    (s as usize) < ix.spans.len(),
                    "span {s} of {}",
                    ix.spans.len()
                );
                used.insert(s);
            }
        }
        let cost: u64 = used
            .iter()
            .map(|&s| ix.spans[s as usize].uncompressed_size)
            .sum();
        assert!(
            cost <= budget,
            "plan of {cost} bytes over its budget {budget}"
        );
        assert!(plan.paths.len() <= 256);
    }
});
