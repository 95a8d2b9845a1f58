//! Keeping the CPUs awake while a CPU step runs.
//!
//! A CPU step is thousands of parallel passes, and between two of them rayon's workers go
//! to sleep within microseconds. A CPU with nothing to run halts; in a virtual machine whose
//! host is busy, a halted virtual CPU gives its physical CPU back and waits to be scheduled
//! again when the next pass wakes its worker. On the 2-core KVM machine the benchmarks run
//! on, in its busy hours, that waiting was a third of the step's CPU time (counted as
//! "steal" in `/proc/stat`) and the step took 1.6x as long.
//!
//! [`awake`] returns a guard; while one is held, one thread per worker spins at the lowest
//! scheduling priority (Linux `SCHED_IDLE`), so a CPU whose worker sleeps runs the spinner
//! instead of halting. A worker that wakes takes its CPU back at once, since the kernel
//! preempts an idle-class thread for any other. This is what OpenMP's active wait policy
//! gives torch's threads, without changing rayon. The spinners are started on the first
//! guard and park when the last guard is dropped, so a host that is not training sees no
//! CPU use.
//!
//! `SDTI_CPU_WAIT=passive` turns this off (`active`, the default, leaves it on); on systems
//! other than Linux there is no idle class and nothing spins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

/// How many guards are held.
static HELD: AtomicUsize = AtomicUsize::new(0);

struct Spinners {
    /// Wakes parked spinners when the first guard is taken.
    wake: Condvar,
    lock: Mutex<()>,
}

static SPINNERS: OnceLock<Option<Spinners>> = OnceLock::new();

/// Keeps the CPUs awake until dropped (see the module's documentation).
pub struct Awake {
    active: bool,
}

impl Drop for Awake {
    fn drop(&mut self) {
        if self.active {
            HELD.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Whether `SDTI_CPU_WAIT` asks for spinning (`active`, or unset) or not (`passive`).
///
/// # Errors
/// Another value, with what it may be.
fn wait_policy_active() -> crate::error::Result<bool> {
    parse_wait_policy(std::env::var("SDTI_CPU_WAIT").ok().as_deref())
}

/// [`wait_policy_active`] for the variable's value (`None`: unset).
fn parse_wait_policy(value: Option<&str>) -> crate::error::Result<bool> {
    let Some(v) = value else {
        return Ok(true);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "active" => Ok(true),
        "passive" => Ok(false),
        _ => Err(crate::error::Error::input(
            "SDTI_CPU_WAIT",
            format!("'{v}' is not a wait policy: it is 'active' (the default) or 'passive'"),
        )),
    }
}

/// A guard that keeps the CPUs awake while held, for work on `device`: nothing spins for
/// another device, when the policy is passive, on systems without an idle scheduling
/// class, or when the spinners could not be started.
///
/// # Errors
/// An `SDTI_CPU_WAIT` value that is neither `active` nor `passive`.
pub fn awake(device: &candle_core::Device) -> crate::error::Result<Awake> {
    if !device.is_cpu() || !wait_policy_active()? {
        return Ok(Awake { active: false });
    }
    let Some(spinners) = SPINNERS.get_or_init(start) else {
        return Ok(Awake { active: false });
    };
    if HELD.fetch_add(1, Ordering::AcqRel) == 0 {
        let _held = spinners.lock.lock().unwrap_or_else(PoisonError::into_inner);
        spinners.wake.notify_all();
    }
    Ok(Awake { active: true })
}

/// Starts one spinner per rayon worker; `None` where no idle class exists or no thread
/// could be started.
fn start() -> Option<Spinners> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let threads = rayon::current_num_threads().max(1);
    let mut started = 0;
    for i in 0..threads {
        let spawned = std::thread::Builder::new()
            .name(format!("sdti-awake-{i}"))
            .stack_size(64 << 10)
            .spawn(spin);
        if spawned.is_ok() {
            started += 1;
        }
    }
    (started > 0).then(|| Spinners {
        wake: Condvar::new(),
        lock: Mutex::new(()),
    })
}

/// A spinner's life: idle class, then spin while a guard is held and park otherwise.
fn spin() {
    if !idle_class() {
        return;
    }
    loop {
        while HELD.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        let Some(Some(spinners)) = SPINNERS.get() else {
            // Not yet published by `awake` (the first guard): look again shortly.
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        };
        let held = spinners.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let _held = spinners
            .wake
            .wait_while(held, |_| HELD.load(Ordering::Acquire) == 0)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Moves the calling thread to the idle scheduling class; false where there is none.
#[cfg(target_os = "linux")]
fn idle_class() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call, and pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn idle_class() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_policy_is_read_or_refused() {
        assert!(parse_wait_policy(None).unwrap());
        assert!(parse_wait_policy(Some("active")).unwrap());
        assert!(parse_wait_policy(Some(" Passive ")).map(|a| !a).unwrap());
        let err = parse_wait_policy(Some("spin")).unwrap_err().to_string();
        assert!(
            err.contains("SDTI_CPU_WAIT") && err.contains("'spin'"),
            "{err}"
        );
        assert!(err.contains("passive"), "{err}");
    }

    /// Each spinner's (thread id, state letter, scheduling policy) from `/proc`.
    #[cfg(target_os = "linux")]
    fn spinners() -> Vec<(String, char, u32)> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return out;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !comm.starts_with("sdti-awake-") {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // The fields after the command's closing parenthesis, from field 3, the state;
            // the policy is field 41 (proc(5)).
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let state = fields.first().and_then(|f| f.chars().next()).unwrap_or('?');
            let policy = fields
                .get(41 - 3)
                .and_then(|f| f.parse::<u32>().ok())
                .unwrap_or(u32::MAX);
            out.push((
                task.file_name().to_string_lossy().into_owned(),
                state,
                policy,
            ));
        }
        out
    }

    /// Polls `/proc` until `ok` holds for the spinners (true) or `secs` pass (false).
    #[cfg(target_os = "linux")]
    fn within(secs: u64, ok: impl Fn(&[(String, char, u32)]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if ok(&spinners()) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn spinners_spin_in_the_idle_class_while_a_guard_is_held_and_park_after() {
        if !wait_policy_active().unwrap_or(false) {
            return; // the environment asked for passive waiting
        }
        let threads = rayon::current_num_threads();
        let guard = awake(&candle_core::Device::Cpu).unwrap();
        // Spinning threads are runnable ('R') whether or not a CPU is free for them, so
        // the check does not depend on what else this process runs.
        let spinning = within(20, |s| {
            s.len() == threads
                && s.iter()
                    .all(|(_, state, policy)| *state == 'R' && *policy == libc::SCHED_IDLE as u32)
        });
        assert!(
            spinning,
            "not all spinners spin in the idle class: {:?}",
            spinners()
        );
        drop(guard);
        // Parked ('S') once no guard is held. Other tests in this process may hold guards
        // for a while (a training step), hence the long wait; spinners that never park
        // fail it.
        let parked = within(600, |s| {
            s.len() == threads && s.iter().all(|(_, state, _)| *state == 'S')
        });
        assert!(
            parked,
            "spinners kept spinning with no guard held: {:?}",
            spinners()
        );
    }
}
