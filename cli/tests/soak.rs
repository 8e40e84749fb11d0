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

#[test]
fn slow_readers_stall_no_good_client() {
    // Attackers that ask for 64 MiB of reads each and never read the answers, while the
    // good clients read (every byte checked as it arrives) and then write (every byte
    // checked after the run): all must succeed, and the server must end clean.
    for rw in ["read", "write"] {
        let out = zcio()
            .args([
                "bench",
                "--rw",
                rw,
                "--size",
                "8M",
                "--files",
                "2",
                "--runtime",
                "2s",
                "--hostile",
                "4",
                "--attack",
                "slow-reader",
                "--verify",
                "--json",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{rw}: {stdout}\n{stderr}");
        let json_end = stdout.rfind("\n}").map(|i| i + 2).unwrap();
        let v: serde_json::Value = serde_json::from_str(&stdout[..json_end]).unwrap();
        let under_attack = &v["results"][1];
        assert_eq!(under_attack["mode"], "zero-copy+attack");
        assert!(
            under_attack["mb_per_s"].as_f64().unwrap() > 0.0,
            "{rw}: no verified operation completed under attack"
        );
        assert_eq!(
            v["server_pool"]["bytes_in_use"], 0,
            "{rw}: server buffers leaked: {v}"
        );
        // The attack ran (its line of the table: tried / contained) and the server
        // caught no panic.
        let tried: u64 = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("slow reader"))
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{rw}: no slow-reader line in {stdout}"));
        assert!(tried > 0, "{rw}: no slow-reader attack ran: {stdout}");
        assert!(stdout.contains(" 0 panics caught"), "{rw}: {stdout}");
        if rw == "write" {
            assert!(stderr.contains("verify: every byte"), "{rw}: {stderr}");
        }
    }
}
