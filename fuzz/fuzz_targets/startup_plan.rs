//! A startup plan blob (JSON, as a node reads it) parses or is refused without panicking, round-trips through its own JSON, its pack table checks or is refused, and short_reason of any reason stays within 64 characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talaria_artifact::startup::plan::{StartupPlan, short_reason};

fuzz_target!(|data: &[u8]| {
    // Any text as an analyzer reason.
    let text = String::from_utf8_lossy(data);
    let short = short_reason(&text);
    assert!(short.chars().count() <= 64, "short_reason kept {short:?}");

    let Ok(plan) = serde_json::from_slice::<StartupPlan>(data) else {
        return;
    };
    let json = serde_json::to_vec(&plan).expect("plan serializes");
    let again: StartupPlan = serde_json::from_slice(&json).expect("serialized plan parses");
    assert!(again == plan, "plan JSON round trip");
    for e in &plan.entries {
        assert!(short_reason(&e.reason).chars().count() <= 64);
    }
    if let Some(t) = &plan.pack
        && t.check().is_ok()
    {
        let records: usize = t.chunks.iter().map(|c| c.records.len()).sum();
        assert!(t.files() <= records);
        assert!(t.chunks.iter().all(|c| c.offset + c.length <= t.size));
        for r in t.chunks.iter().flat_map(|c| &c.records) {
            assert!((r.layer as usize) < t.layers.len());
            assert!(r.offset + r.len <= r.file_size);
        }
    }
});
