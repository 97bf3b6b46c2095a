//! Who may connect: `--allow` and `--deny` address ranges.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Allow and deny lists of address ranges (IPv4 and IPv6, CIDR or single addresses).
///
/// Deny wins; with any allow entry, every address not allowed is refused; empty lists admit all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Access {
    /// Admits everyone.
    pub fn new() -> Access {
        Access::default()
    }

    /// Admits `range` (and, once any range is allowed, only allowed ranges).
    pub fn allow(mut self, range: Range) -> Access {
        self.allow.push(range.0);
        self
    }

    /// Refuses `range`, even if it is also allowed.
    pub fn deny(mut self, range: Range) -> Access {
        self.deny.push(range.0);
        self
    }

    /// Whether a client from `ip` may connect. IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`,
    /// seen on a dual-stack listener) are judged as the IPv4 address they carry.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// An address range: `10.0.0.0/8`, `::1/128`, or a single address such as `192.0.2.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range(IpNet);

impl Range {
    /// Whether `ip` is in the range; an IPv4-mapped IPv6 address as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// The error for text that is neither a CIDR range nor an IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRange(String);

impl fmt::Display for BadRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not an address range (expected CIDR like 10.0.0.0/8 or ::1/128, or an address)",
            self.0
        )
    }
}

impl std::error::Error for BadRange {}

impl FromStr for Range {
    type Err = BadRange;

    fn from_str(text: &str) -> Result<Range, BadRange> {
        let net = match text.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => text
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| BadRange(text.to_string()))?,
        };
        Ok(Range(canonical(net)))
    }
}

/// An IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) as the IPv4 range it maps
/// (`10.0.0.0/8`): addresses are judged in their canonical form (a mapped address as the IPv4
/// address it carries), so ranges must be too, or a mapped range would never match anything.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        net => net,
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The threads the server may still start: connection threads and chat drainers draw on it, so
/// that together they never pass the kernel's limit on memory maps (see [`thread_room`]), past
/// which a new thread aborts the whole process.
#[derive(Debug)]
pub(crate) struct ThreadRoom {
    /// `None`: no limit known (off Linux).
    left: Option<std::sync::atomic::AtomicUsize>,
}

impl ThreadRoom {
    pub(crate) fn new(room: Option<usize>) -> ThreadRoom {
        ThreadRoom {
            left: room.map(std::sync::atomic::AtomicUsize::new),
        }
    }

    /// Takes room for one thread, if there is any left: give it back when the thread ends.
    pub(crate) fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.left.as_ref().is_none_or(|left| {
            left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
        })
    }

    /// Gives back what [`take`](ThreadRoom::take) took.
    pub(crate) fn give_back(&self) {
        if let Some(left) = &self.left {
            left.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Memory maps a thread takes: its stack and guard page, and the signal stack Rust gives it and
/// that one's guard page.
#[cfg(target_os = "linux")]
const MAPS_PER_THREAD: usize = 4;

/// How many more threads this process can start before the kernel's limit on memory maps
/// (`vm.max_map_count`, 65,530 by default) is reached, keeping `spare` maps for everything else.
/// Past that limit a new thread can't set up its signal stack, and Rust's runtime aborts the
/// whole process (a failure it has no way to report): so the server refuses a client rather than
/// start a thread beyond it. `None` where there is no such limit to read (off Linux).
pub(crate) fn thread_room(spare: usize) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let limit: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let used = std::fs::read_to_string("/proc/self/maps")
            .ok()?
            .lines()
            .count();
        Some(limit.saturating_sub(used).saturating_sub(spare) / MAPS_PER_THREAD)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = spare;
        None
    }
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does, and
/// returns the new limit. Each client is one descriptor. On Windows there is no such limit to
/// raise for sockets, so it returns `u64::MAX`.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    #[cfg(unix)]
    return rlimit::increase_nofile_limit(u64::MAX);
    #[cfg(not(unix))]
    return Ok(u64::MAX);
}

/// Grows the kernel's descriptor table of this process to hold `count` descriptors now, so a burst
/// of connections doesn't grow it later.
///
/// Linux doubles the table as descriptors are opened, and in a multi-threaded process each growth
/// waits for an RCU grace period: tens of milliseconds on a virtual machine, during which nothing
/// is accepted, the listen queue overflows and connecting clients stall a second on SYN retries.
/// Growing it once up front (best when the process still has one thread) avoids all of that.
/// Best effort: it is capped at the open-file limit, and does nothing off Unix.
pub fn reserve_descriptors(count: usize) {
    #[cfg(unix)]
    {
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        let highest = (count as u64).min(limit.saturating_sub(1));
        let Ok(highest) = i32::try_from(highest) else {
            return;
        };
        // A duplicate of stdin (or any open descriptor) at the highest number grows the table;
        // closing it (on drop) keeps the table at that size.
        match rustix::io::fcntl_dupfd_cloexec(std::io::stdin(), highest) {
            Ok(_reserved) => tracing::debug!("descriptor table holds {} now", highest + 1),
            Err(e) => tracing::debug!("cannot reserve {count} descriptors: {e}"),
        }
    }
    #[cfg(not(unix))]
    let _ = count;
}

#[cfg(test)]
mod tests {
    use super::ThreadRoom;

    #[test]
    fn the_thread_room_is_taken_and_given_back() {
        let room = ThreadRoom::new(Some(2));
        assert!(room.take() && room.take());
        assert!(!room.take(), "a third thread beyond the room");
        room.give_back();
        assert!(room.take());
        let unlimited = ThreadRoom::new(None);
        assert!((0..10_000).all(|_| unlimited.take()));
    }

    use super::*;

    fn range(text: &str) -> Range {
        text.parse().expect("valid range")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid ip")
    }

    #[test]
    fn empty_lists_admit_everyone() {
        assert!(Access::new().permits(ip("192.0.2.1")));
        assert!(Access::new().permits(ip("::1")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let access = Access::new()
            .allow(range("127.0.0.0/8"))
            .deny(range("127.0.0.2"));
        assert!(access.permits(ip("127.0.0.1")));
        assert!(!access.permits(ip("127.0.0.2")));
        assert!(!access.permits(ip("192.0.2.1")), "not allowed");
        assert!(!access.permits(ip("::1")), "not allowed");
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let access = Access::new()
            .deny(range("::1/128"))
            .deny(range("10.0.0.0/8"));
        assert!(!access.permits(ip("::1")));
        assert!(
            !access.permits(ip("::ffff:10.1.2.3")),
            "mapped v4 judged as v4"
        );
        assert!(access.permits(ip("::2")));
        assert!(access.permits(ip("127.0.0.1")));
    }

    /// A range written in IPv4-mapped form judges what it maps, in either form: a dual-stack
    /// listener sees `::ffff:127.0.0.1`, which is judged as `127.0.0.1`.
    #[test]
    fn mapped_ranges_are_the_ipv4_ranges_they_map() {
        assert_eq!(range("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(range("::ffff:127.0.0.1").to_string(), "127.0.0.1/32");
        let access = Access::new().deny(range("::ffff:127.0.0.1"));
        assert!(!access.permits(ip("::ffff:127.0.0.1")));
        assert!(!access.permits(ip("127.0.0.1")));
        assert!(access.permits(ip("127.0.0.2")));
        let all_mapped = range("::ffff:0:0/96");
        assert!(all_mapped.contains(ip("192.0.2.1")));
        assert!(!all_mapped.contains(ip("::1")));
        // Not mapped: left alone.
        assert_eq!(range("::/0").to_string(), "::/0");
        assert_eq!(range("2001:db8::/96").to_string(), "2001:db8::/96");
    }

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!(range("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(range("::1").to_string(), "::1/128");
        assert!("10.0.0.0/33".parse::<Range>().is_err());
        assert!("localhost".parse::<Range>().is_err());
    }
}
