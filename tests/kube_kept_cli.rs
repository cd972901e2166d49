//! `kvstrap status` and `volumes` show the PVs kept for volumes gone from the node (a
//! vanished disk whose PV was Bound), from the publisher's ledger in the state directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn status_lists_pvs_kept_for_vanished_volumes() {
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        state.path().join("scrub.json"),
        r#"{"version":1,"volumes":{
            "kvstrap-n-gone":{"volume":"gone","published":true,"in_cluster":true,"phase":"Bound","last_scrub":null,"kept":true},
            "kvstrap-n-here":{"volume":"here","published":true,"in_cluster":true,"phase":"Available","last_scrub":null}}}"#,
    )
    .unwrap();
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvstrap"));
        cmd.arg("--state-dir").arg(state.path());
        if json {
            cmd.args(["--output", "json"]);
        }
        let out = cmd.arg("status").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let doc: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(
        doc["kept_pvs"],
        serde_json::json!([{"pv_name": "kvstrap-n-gone", "volume": "gone", "phase": "Bound"}])
    );
    let text = run(false);
    assert!(
        text.contains("kept PersistentVolume kvstrap-n-gone (Bound): volume gone is gone"),
        "{text}"
    );
    assert!(!text.contains("kvstrap-n-here"), "{text}");
}
