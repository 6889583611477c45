//! Importing dnsmasq `log-queries` logs (for `policy import`): syslog lines become a learn
//! log of `query` events. A dnsmasq log has no flows.
//!
//! Both forms are read: plain `log-queries`, where the answer lines of a query are found by
//! name (the latest query of that name and a fitting type, or the query whose CNAME chain the
//! line continues), and `log-queries=extra`, where every line carries the query's serial and
//! attribution is exact. Lines look like
//!
//! ```text
//! Nov 22 10:00:01 dnsmasq[1234]: query[A] example.com from 198.51.100.202
//! Nov 22 10:00:01 host dnsmasq[1234]: 5 198.51.100.202/43567 reply example.com is 198.51.100.34
//! 2026-11-22T10:00:01.123456+01:00 host dnsmasq[1234]: cached example.com is <CNAME>
//! ```
//!
//! Classic syslog timestamps carry no year and no zone: they are read as UTC in the given
//! year, and a log that runs from December into January moves on to the next year. RFC 3339
//! timestamps (rsyslog's default) are read as they are, and the year is not needed.
//!
//! What each query gets: `rcode` NOERROR for addresses, CNAMEs, NODATA and other record
//! types, NXDOMAIN, or the code of a `... error is REFUSED` line; TIMEOUT when no answer line
//! follows. `answers` are the A/AAAA addresses of the answer lines (those of its CNAME chain),
//! `cnames` the chain's targets where the log names them (dnsmasq does not name the target of
//! a `--cname` it answers itself), `ttl` is never known.
//!
//! Junk (lines of other programs, truncated lines, bad dates) is reported with its line
//! number and skipped. dnsmasq's own lines that are not about queries (start-up, cache,
//! DHCP, DNSSEC) are skipped silently. Never panics, whatever the input.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::log::{self, Event, Header, Query, SCHEMA, VERSION};
use crate::read::Junk;

/// A dnsmasq log turned into learn-log events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// A header, then one `query` event per query line, in log order. Only the header when
    /// no query was found.
    pub events: Vec<Event>,
    /// Lines skipped, in file order.
    pub junk: Vec<Junk>,
    /// Query events in `events`.
    pub queries: usize,
}

/// The years a timestamp may have (those RFC 3339 can write, from the Unix epoch on).
pub const YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

/// Reads a dnsmasq log. `label` names the file in messages and in the header's `source`;
/// `year` is the year of the first classic syslog timestamp.
pub fn import(text: &str, label: &str, year: i32) -> Imported {
    let mut importer = Importer {
        label,
        year,
        last_month: None,
        queries: Vec::new(),
        by_serial: HashMap::new(),
        last: None,
        junk: Vec::new(),
        first_time: None,
    };
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Err(problem) = importer.line(line) {
            importer.junk.push(Junk {
                line: i + 1,
                message: format!("{label}:{}: {problem}", i + 1),
            });
        }
    }
    importer.finish()
}

/// One query being put together from its lines.
struct Building {
    query: Query,
    /// Some answer line has been attributed to it.
    answered: bool,
    /// The last answer line was a CNAME: the next line of this answer names its target.
    expect_target: bool,
}

struct Importer<'a> {
    label: &'a str,
    year: i32,
    last_month: Option<u32>,
    queries: Vec<Building>,
    /// `log-queries=extra`: serial -> index into `queries`.
    by_serial: HashMap<u64, usize>,
    /// The query the previous answer line went to (plain form: a chain continues there).
    last: Option<usize>,
    junk: Vec<Junk>,
    first_time: Option<String>,
}

/// How far back the plain form looks for the query an answer line belongs to.
const LOOK_BACK: usize = 256;

impl Importer<'_> {
    fn line(&mut self, line: &str) -> Result<(), String> {
        let (time, rest) = self.timestamp(line)?;
        let message = dnsmasq_message(rest)?;
        let Some(message) = message else {
            return Ok(()); // dnsmasq-dhcp and the like
        };
        // `log-queries=extra`: "SERIAL CLIENT/PORT " before the message.
        let (serial, message) = match split_word(message) {
            Some((first, after))
                if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) =>
            {
                let (_client, after) = split_word(after)
                    .filter(|(c, _)| c.contains('/'))
                    .ok_or_else(|| format!("truncated dnsmasq line: {message:?}"))?;
                let serial = first
                    .parse::<u64>()
                    .map_err(|_| format!("query serial out of range: {first:?}"))?;
                (Some(serial), after)
            }
            _ => (None, message),
        };
        let (verb, args) = split_word(message).unwrap_or((message, ""));
        let words: Vec<&str> = args.split_whitespace().collect();
        if let Some(qtype) = verb.strip_prefix("query[") {
            let qtype = qtype
                .strip_suffix(']')
                .filter(|t| !t.is_empty())
                .ok_or_else(|| format!("truncated query line: {message:?}"))?;
            let [name, "from", _client, ..] = words[..] else {
                return Err(format!("truncated query line: {message:?}"));
            };
            self.query(serial, &time, name, qtype);
            return Ok(());
        }
        if verb == "forwarded" {
            return match words[..] {
                [_, "to", _, ..] => Ok(()),
                _ => Err(format!("truncated forwarded line: {message:?}")),
            };
        }
        if is_answer_source(verb) {
            // "NAME is DEST": DEST may hold spaces (TXT data, "(EDE: ...)").
            let [name, "is", _, ..] = words[..] else {
                return Err(format!("truncated answer line: {message:?}"));
            };
            let dest = args
                .split_once(" is ")
                .map(|(_, d)| d.trim())
                .unwrap_or_default();
            self.answer(serial, name, dest);
        }
        // Anything else dnsmasq says (start-up, DNSSEC, ipset...) is not a query's.
        Ok(())
    }

    /// The timestamp at the start of `line`, as an event time, and the rest of the line.
    fn timestamp<'l>(&mut self, line: &'l str) -> Result<(String, &'l str), String> {
        let first = line.split_whitespace().next().unwrap_or_default();
        let (secs, millis, rest) = if first.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            let (secs, millis) = rfc3339(first).ok_or_else(|| {
                format!("bad date {first:?}: expected a syslog or RFC 3339 timestamp")
            })?;
            let rest = line.trim_start().get(first.len()..).unwrap_or_default();
            (secs, millis, rest)
        } else {
            let (month, rest) = split_word(line.trim_start()).unwrap_or_default();
            let (day, rest) = split_word(rest).unwrap_or_default();
            let (clock, rest) = split_word(rest).unwrap_or_default();
            let stamp = format!("{month} {day} {clock}");
            let bad = || {
                format!(
                    "bad date {stamp:?}: expected a syslog timestamp such as \"Nov 22 10:00:01\""
                )
            };
            let month = month_number(month).ok_or_else(|| {
                format!("not a dnsmasq log line: expected a timestamp such as \"Nov 22 10:00:01\", found {:?}", truncate(line))
            })?;
            let day: u32 = number(day, 2).ok_or_else(bad)?;
            let (h, m, s) = hms(clock).ok_or_else(bad)?;
            let mut year = self.year;
            if self.last_month == Some(12) && month == 1 {
                self.year = self.year.saturating_add(1);
                year = self.year;
            }
            if !YEARS.contains(&year) || day == 0 || day > days_in_month(year, month) {
                return Err(bad());
            }
            self.last_month = Some(month);
            let secs = days_from_civil(year, month, day) * 86_400
                + i64::from(h) * 3600
                + i64::from(m) * 60
                + i64::from(s);
            (secs, 0, rest)
        };
        let secs = u64::try_from(secs).map_err(|_| "date before 1970".to_owned())?;
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
        let time = log::timestamp(t);
        if self.first_time.is_none() {
            self.first_time = Some(time.clone());
        }
        Ok((time, rest))
    }

    fn query(&mut self, serial: Option<u64>, time: &str, name: &str, qtype: &str) {
        let qtype = match qtype.strip_prefix("type=") {
            Some(n) => format!("TYPE{n}"),
            None => qtype.to_ascii_uppercase(),
        };
        self.queries.push(Building {
            query: Query {
                time: time.to_owned(),
                name: normalize(name),
                qtype,
                rcode: "TIMEOUT".to_owned(),
                answers: Vec::new(),
                cnames: Vec::new(),
                ttl: None,
            },
            answered: false,
            expect_target: false,
        });
        let index = self.queries.len() - 1;
        if let Some(serial) = serial {
            self.by_serial.insert(serial, index);
        }
    }

    fn answer(&mut self, serial: Option<u64>, name: &str, dest: &str) {
        let name = normalize(name);
        let word = dest.split_whitespace().next().unwrap_or_default();
        let addr = word.parse::<IpAddr>().ok();
        let index = match serial {
            Some(serial) => self.by_serial.get(&serial).copied(),
            None => self.find(&name, word, addr),
        };
        let Some(index) = index else {
            return; // an answer to a query from before the log began
        };
        self.last = Some(index);
        let Some(b) = self.queries.get_mut(index) else {
            return;
        };
        if name != b.query.name && name != "error" && !b.query.cnames.contains(&name) {
            if b.expect_target || serial.is_some() {
                b.query.cnames.push(name.clone());
            } else {
                return;
            }
        }
        b.expect_target = word == "<CNAME>";
        let rcode = if name == "error" {
            match word {
                "" => "SERVFAIL".to_owned(),
                "not" => "NOTIMP".to_owned(), // "not implemented"
                w => w.to_ascii_uppercase(),
            }
        } else if word == "NXDOMAIN" {
            // Also at the end of a CNAME chain: the answer's rcode is the chain's.
            "NXDOMAIN".to_owned()
        } else {
            "NOERROR".to_owned()
        };
        if let Some(addr) = addr
            && !b.query.answers.contains(&addr)
        {
            b.query.answers.push(addr);
        }
        b.query.rcode = rcode;
        b.answered = true;
    }

    /// Plain form: the query an answer line of `name` belongs to.
    fn find(&self, name: &str, word: &str, addr: Option<IpAddr>) -> Option<usize> {
        let fits = |b: &Building| match (addr, word) {
            (Some(IpAddr::V4(_)), _) | (_, "NODATA-IPv4") => b.query.qtype != "AAAA",
            (Some(IpAddr::V6(_)), _) | (_, "NODATA-IPv6") => b.query.qtype != "A",
            _ => true,
        };
        if let Some(i) = self.last
            && let Some(b) = self.queries.get(i)
            && (b.expect_target || b.query.cnames.last().is_some_and(|c| c == name))
            && name != b.query.name
        {
            return Some(i);
        }
        let start = self.queries.len().saturating_sub(LOOK_BACK);
        let recent = || self.queries.iter().enumerate().skip(start).rev();
        if name == "error" {
            return recent().find(|(_, b)| !b.answered).map(|(i, _)| i);
        }
        let named = |b: &Building| b.query.name == name && fits(b);
        recent()
            .find(|(_, b)| !b.answered && named(b))
            .or_else(|| recent().find(|(_, b)| named(b)))
            .map(|(i, _)| i)
    }

    fn finish(self) -> Imported {
        let header = Event::Header(Header {
            schema: SCHEMA.to_owned(),
            version: VERSION,
            started: self.first_time.unwrap_or_else(log::now),
            source: format!("dnsmasq log-queries ({})", self.label),
            command: Vec::new(),
        });
        let queries = self.queries.len();
        let mut events = Vec::with_capacity(queries + 1);
        events.push(header);
        events.extend(self.queries.into_iter().map(|b| Event::Query(b.query)));
        Imported {
            events,
            junk: self.junk,
            queries,
        }
    }
}

/// After the timestamp: an optional host name, then `dnsmasq[PID]:` or `dnsmasq:`. Returns the
/// message, `None` for another dnsmasq program (`dnsmasq-dhcp`), an error for other programs.
fn dnsmasq_message(rest: &str) -> Result<Option<&str>, String> {
    let (first, after) = split_word(rest).unwrap_or_default();
    let (program, message) = if first.ends_with(':') {
        (first, after)
    } else {
        split_word(after).unwrap_or_default()
    };
    let Some(program) = program.strip_suffix(':') else {
        return Err(format!(
            "not a dnsmasq log line: expected \"dnsmasq[PID]:\" after the date, found {:?}",
            truncate(rest.trim())
        ));
    };
    let base = program.split('[').next().unwrap_or_default();
    let pid_ok = match program.get(base.len()..) {
        Some("") => true,
        Some(p) => p
            .strip_prefix('[')
            .and_then(|p| p.strip_suffix(']'))
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    };
    if !pid_ok || !base.starts_with("dnsmasq") {
        return Err(format!(
            "not a dnsmasq log line: the program is {:?}",
            truncate(program)
        ));
    }
    if base != "dnsmasq" {
        return Ok(None);
    }
    Ok(Some(message.trim()))
}

/// The sources of answer lines: `reply`, `cached`, `config`, a hosts file...
fn is_answer_source(verb: &str) -> bool {
    matches!(
        verb,
        "reply" | "cached" | "cached-stale" | "config" | "DHCP" | "auth"
    ) || (verb.starts_with('/') && verb.len() > 1)
}

/// The first whitespace-separated word and what follows it (leading spaces removed).
fn split_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    Some(match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim_start()),
        None => (s, ""),
    })
}

/// Lowercase, without a trailing dot.
fn normalize(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// At most 40 characters of `s`, for messages.
fn truncate(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn month_number(m: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS
        .iter()
        .position(|&n| n == m)
        .and_then(|i| u32::try_from(i + 1).ok())
}

/// A decimal number of 1 to `max_digits` digits.
fn number(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// "HH:MM:SS".
fn hms(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.split(':');
    let h = parts
        .next()
        .filter(|p| p.len() == 2)
        .and_then(|p| number(p, 2))?;
    let m = parts
        .next()
        .filter(|p| p.len() == 2)
        .and_then(|p| number(p, 2))?;
    let s = parts
        .next()
        .filter(|p| p.len() == 2)
        .and_then(|p| number(p, 2))?;
    (parts.next().is_none() && h < 24 && m < 60 && s < 60).then_some((h, m, s))
}

/// "YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)" as Unix seconds and milliseconds.
fn rfc3339(s: &str) -> Option<(i64, u64)> {
    let (date, time) = s.split_once(['T', 't'])?;
    let mut d = date.split('-');
    let year = d
        .next()
        .filter(|p| p.len() == 4)
        .and_then(|p| number(p, 4))?;
    let month = d
        .next()
        .filter(|p| p.len() == 2)
        .and_then(|p| number(p, 2))?;
    let day = d
        .next()
        .filter(|p| p.len() == 2)
        .and_then(|p| number(p, 2))?;
    let year = i32::try_from(year).ok()?;
    if d.next().is_some()
        || !YEARS.contains(&year)
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
    {
        return None;
    }
    let zone_at = time.find(['Z', 'z', '+', '-'])?;
    let (clock, zone) = time.split_at(zone_at);
    let (clock, fraction) = match clock.split_once('.') {
        Some((c, f)) => (c, Some(f)),
        None => (clock, None),
    };
    let (h, m, sec) = hms(clock)?;
    let millis = match fraction {
        None => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let digits: String = f.chars().chain("000".chars()).take(3).collect();
            digits.parse::<u64>().ok()?
        }
        Some(_) => return None,
    };
    let offset = match zone {
        "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (oh, om) = z.get(1..)?.split_once(':')?;
            let oh = number(oh, 2).filter(|h| *h < 24)?;
            let om = number(om, 2).filter(|m| *m < 60)?;
            sign * (i64::from(oh) * 3600 + i64::from(om) * 60)
        }
    };
    let secs = days_from_civil(year, month, day) * 86_400
        + i64::from(h) * 3600
        + i64::from(m) * 60
        + i64::from(sec)
        - offset;
    Some((secs, millis))
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn queries(imported: &Imported) -> Vec<&Query> {
        imported
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Query(q) => Some(q),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 22), 20_779);
        assert_eq!(
            rfc3339("2026-11-22T10:00:01.123456+01:00"),
            Some((20_779 * 86_400 + 9 * 3600 + 1, 123))
        );
        assert_eq!(
            rfc3339("2026-11-22T10:00:01Z"),
            Some((20_779 * 86_400 + 36_001, 0))
        );
        assert_eq!(rfc3339("2026-02-29T10:00:01Z"), None);
        assert_eq!(rfc3339("2026-11-22T10:00:01"), None);
        assert_eq!(hms("24:00:00"), None);
        assert_eq!(hms("1:00:00"), None);
    }

    #[test]
    fn plain_form() {
        let log = "\
Nov 22 10:00:00 dnsmasq[1]: started, version 2.90 cachesize 150
Nov 22 10:00:01 dnsmasq[1]: query[A] Example.COM. from 198.51.100.202
Nov 22 10:00:01 dnsmasq[1]: query[AAAA] example.com from 198.51.100.202
Nov 22 10:00:01 dnsmasq[1]: forwarded example.com to 198.51.100.253
Nov 22 10:00:01 dnsmasq[1]: forwarded example.com to 198.51.100.253
Nov 22 10:00:01 dnsmasq[1]: reply example.com is 2001:db8::7
Nov 22 10:00:01 dnsmasq[1]: reply example.com is 198.51.100.34
Nov  2 10:00:02 dnsmasq[1]: query[A] www.example.org from 198.51.100.202
Nov  2 10:00:02 dnsmasq[1]: reply www.example.org is <CNAME>
Nov  2 10:00:02 dnsmasq[1]: reply edge.example.net is <CNAME>
Nov  2 10:00:02 dnsmasq[1]: reply edge2.example.net is 198.51.100.1
Nov  2 10:00:02 dnsmasq[1]: reply edge2.example.net is 198.51.100.2
Nov  2 10:00:03 dnsmasq[1]: query[A] nope.example from 198.51.100.202
Nov  2 10:00:03 dnsmasq[1]: reply nope.example is NXDOMAIN
Nov  2 10:00:04 dnsmasq[1]: query[A] refused.example from 198.51.100.202
Nov  2 10:00:04 dnsmasq[1]: reply error is REFUSED
Nov  2 10:00:05 dnsmasq[1]: query[type=65] svc.example from 198.51.100.202
Nov  2 10:00:05 dnsmasq[1]: query[A] cache.example from 198.51.100.202
Nov  2 10:00:05 dnsmasq[1]: cached cache.example is 198.51.100.209
Nov  2 10:00:05 dnsmasq[1]: query[A] hosts.example from 198.51.100.202
Nov  2 10:00:05 dnsmasq[1]: /etc/hosts hosts.example is 198.51.100.210
Nov  2 10:00:05 dnsmasq[1]: query[TXT] t.example from 198.51.100.202
Nov  2 10:00:05 dnsmasq[1]: reply t.example is v=spf1 a is ok
Nov  2 10:00:05 dnsmasq[1]: query[AAAA] v4only.example from 198.51.100.202
Nov  2 10:00:05 dnsmasq[1]: config v4only.example is NODATA-IPv6
";
        let imported = import(log, "d.log", 2026);
        assert!(imported.junk.is_empty(), "{:?}", imported.junk);
        assert_eq!(imported.queries, 10);
        let Event::Header(h) = &imported.events[0] else {
            panic!("no header");
        };
        assert_eq!(h.source, "dnsmasq log-queries (d.log)");
        assert_eq!(h.started, "2026-11-22T10:00:00.000Z");
        let q = queries(&imported);
        assert_eq!(q[0].name, "example.com");
        assert_eq!(q[0].time, "2026-11-22T10:00:01.000Z");
        assert_eq!(
            q[0].answers,
            vec!["198.51.100.34".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(q[1].qtype, "AAAA");
        assert_eq!(q[1].answers, vec!["2001:db8::7".parse::<IpAddr>().unwrap()]);
        assert_eq!(q[2].time, "2026-11-02T10:00:02.000Z");
        assert_eq!(q[2].cnames, vec!["edge.example.net", "edge2.example.net"]);
        assert_eq!(q[2].answers.len(), 2);
        assert_eq!(q[2].rcode, "NOERROR");
        assert_eq!(q[3].rcode, "NXDOMAIN");
        assert_eq!(q[4].rcode, "REFUSED");
        assert_eq!(
            (q[5].qtype.as_str(), q[5].rcode.as_str()),
            ("TYPE65", "TIMEOUT")
        );
        assert_eq!(q[6].answers.len(), 1);
        assert_eq!(q[7].answers.len(), 1);
        assert_eq!((q[8].rcode.as_str(), q[8].answers.len()), ("NOERROR", 0));
        assert_eq!((q[9].rcode.as_str(), q[9].answers.len()), ("NOERROR", 0));
        assert!(q.iter().all(|q| q.ttl.is_none()));
    }

    #[test]
    fn extra_form_with_hosts_and_rfc3339() {
        let log = "\
2026-11-22T10:00:01.250+01:00 box dnsmasq[7]: 5 198.51.100.202/43567 query[A] a.example from 198.51.100.202
2026-11-22T10:00:01.250+01:00 box dnsmasq[7]: 6 198.51.100.203/1000 query[A] a.example from 198.51.100.203
2026-11-22T10:00:01.300+01:00 box dnsmasq[7]: 6 198.51.100.203/1000 reply a.example is <CNAME>
2026-11-22T10:00:01.300+01:00 box dnsmasq[7]: 6 198.51.100.203/1000 reply b.example is 198.51.100.201
2026-11-22T10:00:01.300+01:00 box dnsmasq[7]: 5 198.51.100.202/43567 reply error is SERVFAIL (EDE: network error)
2026-11-22T10:00:01.300+01:00 box dnsmasq-dhcp[7]: DHCPACK(eth0) 198.51.100.209
";
        let imported = import(log, "x.log", 1999);
        assert!(imported.junk.is_empty(), "{:?}", imported.junk);
        let q = queries(&imported);
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].time, "2026-11-22T09:00:01.250Z");
        assert_eq!(q[0].rcode, "SERVFAIL");
        assert_eq!(q[1].cnames, vec!["b.example"]);
        assert_eq!(
            q[1].answers,
            vec!["198.51.100.201".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn junk_lines_are_located_and_skipped() {
        let log = "\
Nov 22 10:00:01 dnsmasq[1]: query[A] a.example from 198.51.100.202
kernel: eth0 link up
Nov 22 10:00:01 sshd[99]: Accepted publickey for root
Nov 22 10:00:01 dnsmasq[1]: query[A] trunc.exam
Nov 31 10:00:01 dnsmasq[1]: query[A] b.example from 198.51.100.202
Nov 22 25:00:01 dnsmasq[1]: query[A] b.example from 198.51.100.202
Nov 22 10:00:01 dnsmasq[1]: reply a.example
Nov 22 10:00:01 dnsmasq[1
Nov 22 10:0
Nov 22 10:00:01 dnsmasq[1]: 12 198.51.100.202
\u{fffd}\u{fffd}
Nov 22 10:00:02 dnsmasq[1]: reply a.example is 198.51.100.201
";
        let imported = import(log, "j.log", 2026);
        let lines: Vec<usize> = imported.junk.iter().map(|j| j.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        for j in &imported.junk {
            assert!(j.message.starts_with(&format!("j.log:{}: ", j.line)), "{j}");
        }
        assert!(imported.junk[0].message.contains("not a dnsmasq log line"));
        assert!(
            imported.junk[1].message.contains("\"sshd[99]\""),
            "{}",
            imported.junk[1]
        );
        assert!(imported.junk[2].message.contains("truncated query line"));
        assert!(
            imported.junk[3]
                .message
                .contains("bad date \"Nov 31 10:00:01\"")
        );
        assert_eq!(imported.queries, 1);
        let q = queries(&imported);
        assert_eq!(q[0].answers.len(), 1);
    }

    #[test]
    fn year_moves_on_in_january() {
        let log = "\
Dec 31 23:59:59 dnsmasq[1]: query[A] a.example from 198.51.100.202
Jan  1 00:00:01 dnsmasq[1]: query[A] b.example from 198.51.100.202
";
        let q = import(log, "y.log", 2025);
        let q = queries(&q);
        assert_eq!(q[0].time, "2025-12-31T23:59:59.000Z");
        assert_eq!(q[1].time, "2026-01-01T00:00:01.000Z");
    }

    #[test]
    fn out_of_range_year_is_junk_not_a_panic() {
        for year in [i32::MIN, -1, 0, 1969, 10_000, i32::MAX] {
            let i = import("Dec 31 23:59:59 dnsmasq[1]: query[A] a from b\n", "y", year);
            assert_eq!(i.junk.len(), 1);
        }
    }

    proptest! {
        #[test]
        fn never_panics(text in any::<String>(), year in any::<i32>()) {
            let _ = import(&text, "f", year);
        }

        #[test]
        fn never_panics_on_near_misses(
            lines in proptest::collection::vec(
                proptest::string::string_regex(
                    "((Nov|Dec|Jan|Feb) [ 0-9]{1,2} [0-9:]{0,9} |20[0-9-]{8}T[0-9:.+Z-]{0,20} )?(box )?(dnsmasq(\\[[0-9]{0,3}\\])?:? )?([0-9]{1,3} [0-9./]{0,12} )?(query\\[[A-Z=0-9]{0,5}\\]?|reply|cached|config|forwarded|/etc/hosts)? ?[a-z.]{0,8} ?(is|from|to)? ?([0-9.:a-f]{0,16}|<CNAME>|NXDOMAIN|error|REFUSED)?"
                ).unwrap(),
                0..20,
            )
        ) {
            let text = lines.join("\n");
            let imported = import(&text, "f", 2026);
            for j in &imported.junk {
                let prefix = format!("f:{}: ", j.line);
                    prop_assert!(j.message.starts_with(&prefix), "{}", j.message);
            }
            prop_assert_eq!(imported.queries + 1, imported.events.len());
        }
    }
}
