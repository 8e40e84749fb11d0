//! Short runs of `zcio soak` and `zcio bench --hostile --verify` as real processes: the long
//! runs and their figures are in the issue notes; these keep the machinery honest in CI.

use std::process::Command;

fn zcio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zcio"))
}

#[test]
fn soak_64_connections_iodepth_32_no_corruption_no_leak() {
    let out = zcio()
        .args([
            "soak",
            "--connections",
            "64",
            "--iodepth",
            "32",
            "--blocks",
            "64",
            // An amount of work, not of time: it ends after 2000 verified reads and 2000
            // writes however slow the machine; 600 s is only the limit.
            "--ops",
            "2000",
            "--runtime",
            "600s",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["corruptions"], 0);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["leaks"].as_array().unwrap().len(), 0, "{v}");
    assert!(v["reads_verified"].as_u64().unwrap() >= 2000, "{v}");
    assert!(v["writes"].as_u64().unwrap() >= 2000, "{v}");
}

#[test]
fn verified_reads_survive_hostile_peers() {
    let out = zcio()
        .args([
            "bench",
            "--size",
            "8M",
            "--files",
            "2",
            "--runtime",
            "2s",
            "--hostile",
            "4",
            "--verify",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The JSON document comes first, the attack table after it.
    let json_end = stdout.rfind("\n}").map(|i| i + 2).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout[..json_end]).unwrap();
    let under_attack = &v["results"][1];
    assert_eq!(under_attack["mode"], "zero-copy+attack");
    assert!(
        under_attack["mb_per_s"].as_f64().unwrap() > 0.0,
        "no verified read completed under attack"
    );
    assert_eq!(
        v["server_pool"]["bytes_in_use"], 0,
        "server buffers leaked: {v}"
    );
}
