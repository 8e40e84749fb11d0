//! Short runs of `zcio soak` and `zcio bench --hostile --verify` as real processes: the long
//! runs and their figures are in the issue notes; these keep the machinery honest in CI.

mod support;

use support::{run_ok, zcio};

/// `zcio bench` of 2 s on two 8 MiB files, every byte verified, with 4 hostile peers and
/// `extra` arguments; it must succeed. Returns its standard output and error.
fn hostile_bench(extra: &[&str]) -> (String, String) {
    run_ok(
        zcio()
            .args(["bench", "--size", "8M", "--files", "2", "--runtime", "2s"])
            .args(["--hostile", "4", "--verify", "--json"])
            .args(extra),
    )
}

/// Checks the JSON document that `zcio bench --hostile` prints before its attack table: a
/// verified operation completed under attack and the server's pool ended with nothing in use.
fn under_attack(what: &str, stdout: &str) {
    let json_end = stdout.rfind("\n}").map(|i| i + 2).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout[..json_end]).unwrap();
    let under_attack = &v["results"][1];
    assert_eq!(under_attack["mode"], "zero-copy+attack");
    assert!(
        under_attack["mb_per_s"].as_f64().unwrap() > 0.0,
        "{what}: no verified operation completed under attack"
    );
    assert_eq!(
        v["server_pool"]["bytes_in_use"], 0,
        "{what}: server buffers leaked: {v}"
    );
}

#[test]
fn soak_64_connections_iodepth_32_no_corruption_no_leak() {
    let (stdout, _) = run_ok(zcio().args([
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
    ]));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["corruptions"], 0);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["leaks"].as_array().unwrap().len(), 0, "{v}");
    assert!(v["reads_verified"].as_u64().unwrap() >= 2000, "{v}");
    assert!(v["writes"].as_u64().unwrap() >= 2000, "{v}");
}

#[test]
fn verified_reads_survive_hostile_peers() {
    let (stdout, _) = hostile_bench(&[]);
    under_attack("reads", &stdout);
}

#[test]
fn slow_readers_stall_no_good_client() {
    // Attackers that ask for 64 MiB of reads each and never read the answers, while the
    // good clients read (every byte checked as it arrives) and then write (every byte
    // checked after the run): all must succeed, and the server must end clean.
    for rw in ["read", "write"] {
        let (stdout, stderr) = hostile_bench(&["--rw", rw, "--attack", "slow-reader"]);
        under_attack(rw, &stdout);
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
