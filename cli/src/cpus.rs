//! `zcio bench --cpus`: where the bench's two sides run.
//!
//! On a small virtual machine a round trip's latency depends mostly on where the woken
//! thread runs: a thread woken on an idle vCPU waits for an inter-processor interrupt and
//! for that vCPU to be scheduled again by the host (tens of microseconds), one woken on the
//! CPU that is already running takes a few. Left alone, the scheduler picks either from run
//! to run, so a latency comparison is only fair when both sides are placed the same way.
//!
//! A *placement* names the CPUs of the client side (the bench's jobs, their transport
//! threads, a baseline's requesting end) and of the server side (the embedded server's
//! threads, a baseline's answering end). A thread is placed by setting its own affinity
//! (`sched_setaffinity`), and the threads it spawns inherit it, so placing the thread that
//! starts the embedded server places every thread the server makes, present and future.
//!
//! `--cpus` takes:
//! - `auto` (the default): with at least two CPUs allowed, the baselines' two ends run on
//!   two different CPUs (the first two allowed), as a client and a server on two machines
//!   do (every reply wakes a thread elsewhere); zcio's threads are not placed. With one
//!   CPU nothing is placed.
//! - `C/S`, two CPU lists such as `0/1` or `0,1/2-3`: the client side on `C` and the server
//!   side on `S`, for zcio and the baselines alike (`0/0`: everything on CPU 0).
//! - `none`: nothing is placed.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::AnyResult;

/// CPUs of the two sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sides {
    pub(crate) client: Vec<usize>,
    pub(crate) server: Vec<usize>,
}

/// What `--cpus` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CpusArg {
    /// Baselines split over two CPUs when there are two; zcio not placed.
    Auto,
    /// Nothing placed.
    None,
    /// Both sides placed, zcio and baselines alike.
    Sides(Sides),
}

/// Parses `auto`, `none` or `C/S` (each a list of CPUs and ranges: `0,2-3`).
pub(crate) fn cpus_arg(s: &str) -> Result<CpusArg, String> {
    match s.trim() {
        "auto" => return Ok(CpusArg::Auto),
        "none" => return Ok(CpusArg::None),
        _ => {}
    }
    let (c, sv) = s.split_once('/').ok_or_else(|| {
        format!("`{s}`: expected auto, none or CLIENT/SERVER CPU lists such as 0/1")
    })?;
    Ok(CpusArg::Sides(Sides {
        client: cpu_list(c)?,
        server: cpu_list(sv)?,
    }))
}

/// `0,2-3` -> [0, 2, 3].
fn cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let max = CpuSet::count();
    let mut v = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |x: &str| -> Result<usize, String> {
            match x.trim().parse::<usize>() {
                Ok(n) if n < max => Ok(n),
                _ => Err(format!("`{x}`: a CPU is a number below {max}")),
            }
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b {
            return Err(format!("`{part}`: a range goes up"));
        }
        v.extend(a..=b);
    }
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(format!("`{s}`: no CPU"));
    }
    Ok(v)
}

/// The CPUs this thread may run on, in order.
pub(crate) fn allowed() -> AnyResult<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&i| set.is_set(i).unwrap_or(false))
        .collect())
}

/// Where zcio's threads and the baselines' ends run for one bench.
#[derive(Clone, Debug, Default)]
pub(crate) struct Placement {
    /// zcio's client jobs and embedded server.
    pub(crate) zcio: Option<Sides>,
    /// The baselines' requesting and answering ends.
    pub(crate) baselines: Option<Sides>,
}

impl Placement {
    /// The placement `arg` asks for on this machine; CPUs this process may not use are an
    /// error naming them.
    pub(crate) fn resolve(arg: &CpusArg) -> AnyResult<Placement> {
        let ok = allowed()?;
        Ok(match arg {
            CpusArg::None => Placement::default(),
            CpusArg::Auto => match ok.as_slice() {
                [c, s, ..] => Placement {
                    zcio: None,
                    baselines: Some(Sides {
                        client: vec![*c],
                        server: vec![*s],
                    }),
                },
                _ => Placement::default(),
            },
            CpusArg::Sides(sides) => {
                let bad: Vec<String> = sides
                    .client
                    .iter()
                    .chain(&sides.server)
                    .filter(|c| !ok.contains(c))
                    .map(usize::to_string)
                    .collect();
                if !bad.is_empty() {
                    return Err(format!(
                        "--cpus: CPU {} not available to this process (it may run on {})",
                        bad.join(", "),
                        show(&ok)
                    )
                    .into());
                }
                Placement {
                    zcio: Some(sides.clone()),
                    baselines: Some(sides.clone()),
                }
            }
        })
    }

    /// For the JSON report.
    pub(crate) fn json(&self) -> serde_json::Value {
        let side = |s: &Option<Sides>| match s {
            Some(s) => serde_json::json!({"client": s.client, "server": s.server}),
            None => serde_json::Value::Null,
        };
        serde_json::json!({"zcio": side(&self.zcio), "baselines": side(&self.baselines)})
    }

    /// One line for the summary.
    pub(crate) fn describe(&self) -> String {
        let side = |s: &Option<Sides>| match s {
            Some(s) => format!(
                "client side on CPU {}, server side on CPU {}",
                show(&s.client),
                show(&s.server)
            ),
            None => "not placed (the scheduler's choice)".to_string(),
        };
        format!(
            "CPUs: zcio {}; baselines {}",
            side(&self.zcio),
            side(&self.baselines)
        )
    }
}

/// `[0, 1, 2, 5]` -> `0-2,5`.
pub(crate) fn show(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if j == i {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Puts the calling thread on `cpus` (threads it spawns from now on inherit them).
pub(crate) fn pin_this_thread(cpus: &[usize]) -> AnyResult<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| format!("placing a thread on CPU {}: {e}", show(cpus)))?;
    Ok(())
}

/// The calling thread on other CPUs until dropped, then back where it was.
pub(crate) struct PinGuard {
    before: Option<CpuSet>,
}

impl PinGuard {
    /// Puts the calling thread on `cpus` (`None`: leaves it) until the guard is dropped.
    pub(crate) fn new(cpus: Option<&[usize]>) -> AnyResult<PinGuard> {
        let Some(cpus) = cpus else {
            return Ok(PinGuard { before: None });
        };
        let before = sched_getaffinity(Pid::from_raw(0))?;
        pin_this_thread(cpus)?;
        Ok(PinGuard {
            before: Some(before),
        })
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(b) = &self.before {
            // Back to a mask this thread had a moment ago: cannot be refused.
            let _ = sched_setaffinity(Pid::from_raw(0), b);
        }
    }
}

/// Spawns `f` on a thread placed on `cpus` (`None`: wherever this thread may run).
pub(crate) fn spawn_on<T: Send + 'static>(
    cpus: Option<&[usize]>,
    f: impl FnOnce() -> T + Send + 'static,
) -> AnyResult<std::thread::JoinHandle<T>> {
    let _g = PinGuard::new(cpus)?;
    Ok(std::thread::Builder::new().spawn(f)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_refuses_nonsense() {
        assert_eq!(cpus_arg("auto"), Ok(CpusArg::Auto));
        assert_eq!(cpus_arg("none"), Ok(CpusArg::None));
        assert_eq!(
            cpus_arg("0,2-3/1"),
            Ok(CpusArg::Sides(Sides {
                client: vec![0, 2, 3],
                server: vec![1]
            }))
        );
        for bad in ["0", "0/", "/1", "a/1", "3-1/0", "0/99999", "0/-1"] {
            assert!(cpus_arg(bad).is_err(), "{bad}");
        }
        assert_eq!(show(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    /// A placed thread runs where it was put, a thread it spawns too, and the guard puts
    /// the thread back.
    #[test]
    fn placement_is_applied_inherited_and_undone() {
        let ok = allowed().unwrap();
        let last = *ok.last().unwrap();
        let before = allowed().unwrap();
        {
            let _g = PinGuard::new(Some(&[last])).unwrap();
            assert_eq!(allowed().unwrap(), vec![last]);
            let child = std::thread::spawn(|| allowed().unwrap()).join().unwrap();
            assert_eq!(child, vec![last]);
        }
        assert_eq!(allowed().unwrap(), before);
        let h = spawn_on(Some(&[ok[0]]), || allowed().unwrap()).unwrap();
        assert_eq!(h.join().unwrap(), vec![ok[0]]);
        assert_eq!(allowed().unwrap(), before);
        // A CPU the process may not use is refused with its number.
        let outside = (0..CpuSet::count()).find(|c| !ok.contains(c)).unwrap();
        let e = Placement::resolve(&CpusArg::Sides(Sides {
            client: vec![ok[0]],
            server: vec![outside],
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains(&outside.to_string()), "{e}");
    }
}
