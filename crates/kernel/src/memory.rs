//! What a long-lived Portcullis process gives back to the kernel. Every `run` is its own
//! process tree (the run, its helper forked from it, the sandbox's PID 1 forked from that), idle
//! for most of its life, so pages that start-up dirtied once and never uses again are paid
//! per sandbox: clap's command tree (freed heap) and its parsing (deep stack), and glibc's
//! per-thread arenas.

/// One malloc arena for the whole process instead of one per thread: each arena keeps its own
/// free pages. Small allocations stay on glibc's per-thread caches, so a few threads rarely
/// meet on the arena's lock. Call before any thread starts.
pub fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the pages of freed heap memory to the kernel (glibc keeps them mapped and dirty).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory that is free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops the pages of the calling thread's stack below the caller's frame: deeper calls that
/// have returned (clap's parsing) left them dirty. The heap's freed pages go back at the fork
/// of the helper (`process::Helper::fork`) and once CMD runs. Call from a shallow frame.
#[inline(never)]
pub fn shed_startup_stack() {
    let marker = 0u8;
    let here = std::ptr::addr_of!(marker) as usize;
    if let Some(low) = stack_start(here) {
        shed_stack_below(here, low);
    }
}

/// Drops the pages of the stack from `low` up to a margin below `here`, an address in the
/// caller's frame.
#[inline(never)]
fn shed_stack_below(here: usize, low: usize) {
    // The caller's frame, this one and the madvise call stay well inside the margin.
    const MARGIN: usize = 16 * 1024;
    const PAGE: usize = 4096;
    let high = here.saturating_sub(MARGIN) & !(PAGE - 1);
    if high > low {
        // SAFETY: [low, high) lies in this thread's stack below every live frame (the stack
        // grows down, and `here` is in the deepest live frame but two small ones); its pages
        // hold nothing anyone reads again, and after MADV_DONTNEED they read as zeros.
        unsafe {
            libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED);
        }
    }
}

/// The lowest address of the mapping that holds `addr`, if it is the main thread's stack.
fn stack_start(addr: usize) -> Option<usize> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter(|l| l.ends_with("[stack]"))
        .filter_map(address_range)
        .find_map(|r| r.contains(&addr).then_some(r.start))
}

/// The address range that starts a line of /proc/PID/maps or smaps (`lo-hi perms ...`).
fn address_range(line: &str) -> Option<std::ops::Range<usize>> {
    let (lo, hi) = line.split_once(' ')?.0.split_once('-')?;
    Some(usize::from_str_radix(lo, 16).ok()?..usize::from_str_radix(hi, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mapping of /proc/self/maps holding `addr`: its start and dirty KiB.
    fn mapping_of(addr: usize) -> (usize, u64) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut current = None;
        for line in smaps.lines() {
            if let Some(range) = address_range(line) {
                current = range.contains(&addr).then_some(range.start);
            } else if let (Some(lo), Some(v)) = (current, line.strip_prefix("Anonymous:")) {
                return (lo, v.trim().trim_end_matches("kB").trim().parse().unwrap());
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    /// Fills about 2 KiB of stack per level.
    #[inline(never)]
    fn deep(n: u32) -> u64 {
        let buf = std::hint::black_box([n as u8; 2048]);
        if n == 0 {
            return 0;
        }
        deep(n - 1) + u64::from(buf[7])
    }

    #[test]
    fn only_the_main_thread_sheds_its_stack() {
        let marker = 0u8;
        let here = std::ptr::addr_of!(marker) as usize;
        let main = nix::unistd::gettid() == nix::unistd::getpid();
        assert_eq!(stack_start(here).is_some(), main);
        // The main thread's stack is found from any address in it (tests run on other threads).
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let stack = maps
            .lines()
            .find(|l| l.ends_with("[stack]"))
            .and_then(address_range)
            .expect("a [stack] mapping");
        assert_eq!(stack_start(stack.end - 64), Some(stack.start));
        assert_eq!(stack_start(stack.start), Some(stack.start));
        assert_eq!(stack_start(stack.end), None);
    }

    #[test]
    fn shedding_frees_the_stack_below_and_keeps_live_frames() {
        // On a thread of its own, with a stack of its own (the same code as the main thread's,
        // which the test harness does not give to tests).
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let live = std::hint::black_box([0x5au8; 4096]);
                let marker = 0u8;
                let here = std::ptr::addr_of!(marker) as usize;
                assert_eq!(deep(100), 100 * 101 / 2);
                let (low, before) = mapping_of(here);
                shed_stack_below(here, low);
                let (_, after) = mapping_of(here);
                assert!(live.iter().all(|b| *b == 0x5a), "a live frame changed");
                assert!(after + 100 <= before, "{before} KiB before, {after} after");
                assert_eq!(deep(100), 100 * 101 / 2);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
