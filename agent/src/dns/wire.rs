//! DNS messages as they arrive from anyone (RFC 1035): every length, count and pointer is
//! checked against the message, names are bounded, compression pointers may only point
//! backwards, and anything odd rejects the whole message. Nothing here panics or loops on
//! hostile input (`fuzz_*` tests below).

use std::net::IpAddr;

use thiserror::Error;

/// Why a message was rejected.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("shorter than its header or than a record it announces")]
    Truncated,
    #[error("a label longer than 63 bytes or of a reserved type")]
    BadLabel,
    #[error("a name longer than 255 bytes")]
    NameTooLong,
    #[error("a compression pointer that does not point backwards")]
    BadPointer,
    #[error("not exactly one question")]
    QuestionCount,
    #[error("a record whose data does not fit its type")]
    BadRecord,
}

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
/// Longest name on the wire (RFC 1035 2.3.4).
const MAX_NAME: usize = 255;
/// CNAME links followed from the question's name.
const MAX_CHAIN: usize = 16;
/// Records read from one message; more are ignored.
const MAX_RECORDS: usize = 256;

/// A message's header and question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
    /// Lower case, without the trailing dot ("" for the root).
    pub name: String,
    pub qtype: u16,
}

/// The addresses an answer gives for its question's name, following its CNAME chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub question: Question,
    /// Each address with its TTL: the smallest TTL along the chain that led to it.
    pub addresses: Vec<(IpAddr, u32)>,
    /// The names of the chain after the question's own, in order.
    pub cnames: Vec<String>,
}

struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self.msg.get(self.pos).ok_or(WireError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let b = self.msg.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(b)
    }
    /// A name at the current position; the position moves past its bytes in place.
    fn name(&mut self) -> Result<String, WireError> {
        let (name, end) = read_name(self.msg, self.pos)?;
        self.pos = end;
        Ok(name)
    }
}

/// Reads the name at `start`: (lower-case dotted name, position after it in place).
/// Pointers must point strictly before the label that holds them, so they cannot loop.
fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), WireError> {
    let mut name = String::new();
    let mut wire_len = 1usize; // the root label
    let mut pos = start;
    let mut end = None;
    // Each jump goes strictly backwards: at most msg.len() jumps, fewer in practice.
    loop {
        let len = *msg.get(pos).ok_or(WireError::Truncated)? as usize;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Ok((name, end.unwrap_or(pos + 1)));
                }
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(WireError::Truncated)?;
                wire_len += 1 + len;
                if wire_len > MAX_NAME {
                    return Err(WireError::NameTooLong);
                }
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in label {
                    // Names are kept printable; other bytes are escaped as \DDD.
                    match b {
                        b'A'..=b'Z' => name.push(b.to_ascii_lowercase() as char),
                        b'.' | b'\\' => {
                            name.push('\\');
                            name.push(b as char);
                        }
                        0x21..=0x7e => name.push(b as char),
                        _ => name.push_str(&format!("\\{b:03}")),
                    }
                }
                pos += 1 + len;
            }
            0xc0 => {
                let low = *msg.get(pos + 1).ok_or(WireError::Truncated)? as usize;
                let target = ((len & 0x3f) << 8) | low;
                if target >= pos {
                    return Err(WireError::BadPointer);
                }
                if end.is_none() {
                    end = Some(pos + 2);
                }
                pos = target;
            }
            _ => return Err(WireError::BadLabel),
        }
    }
}

fn header_and_question(msg: &[u8]) -> Result<(Reader<'_>, Question, u16), WireError> {
    let mut r = Reader { msg, pos: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    let qdcount = r.u16()?;
    let ancount = r.u16()?;
    let _nscount = r.u16()?;
    let _arcount = r.u16()?;
    if qdcount != 1 {
        return Err(WireError::QuestionCount);
    }
    let name = r.name()?;
    let qtype = r.u16()?;
    let _qclass = r.u16()?;
    Ok((
        r,
        Question {
            id,
            response: flags & 0x8000 != 0,
            rcode: (flags & 0x000f) as u8,
            name,
            qtype,
        },
        ancount,
    ))
}

/// The header and question of a query (or of any message).
pub fn parse_question(msg: &[u8]) -> Result<Question, WireError> {
    header_and_question(msg).map(|(_, q, _)| q)
}

/// An answer: its question and what the answer section says about that name.
pub fn parse_answer(msg: &[u8]) -> Result<Answer, WireError> {
    let (mut r, question, ancount) = header_and_question(msg)?;
    struct Record {
        owner: String,
        rtype: u16,
        ttl: u32,
        data: RecordData,
    }
    enum RecordData {
        Address(IpAddr),
        Alias(String),
        Other,
    }
    let mut records = Vec::new();
    for _ in 0..ancount {
        let owner = r.name()?;
        let rtype = r.u16()?;
        let class = r.u16()?;
        let ttl = r.u32()?;
        let rdlen = r.u16()? as usize;
        let rdata_start = r.pos;
        let rdata = r.bytes(rdlen)?;
        let data = match (rtype, class) {
            (TYPE_A, CLASS_IN) => {
                let octets: [u8; 4] = rdata.try_into().map_err(|_| WireError::BadRecord)?;
                RecordData::Address(IpAddr::from(octets))
            }
            (TYPE_AAAA, CLASS_IN) => {
                let octets: [u8; 16] = rdata.try_into().map_err(|_| WireError::BadRecord)?;
                RecordData::Address(IpAddr::from(octets))
            }
            (TYPE_CNAME, CLASS_IN) => {
                let (target, end) = read_name(msg, rdata_start)?;
                if end != rdata_start + rdlen {
                    return Err(WireError::BadRecord);
                }
                RecordData::Alias(target)
            }
            _ => RecordData::Other,
        };
        if records.len() < MAX_RECORDS {
            // TTLs above 2^31 - 1 are read as 0 (RFC 2181 8).
            let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
            records.push(Record {
                owner,
                rtype,
                ttl,
                data,
            });
        }
    }
    // Follow the chain from the question's name: only records about a name of the chain
    // count, whatever else the answer carries.
    let mut chain: Vec<(String, u32)> = vec![(question.name.clone(), u32::MAX)];
    while chain.len() <= MAX_CHAIN {
        let (last, ttl) = chain.last().expect("non-empty").clone();
        let next = records.iter().find_map(|rec| match &rec.data {
            RecordData::Alias(target) if rec.owner == last => Some((target.clone(), rec.ttl)),
            _ => None,
        });
        match next {
            Some((target, t)) if !chain.iter().any(|(n, _)| *n == target) => {
                chain.push((target, ttl.min(t)))
            }
            _ => break,
        }
    }
    let mut addresses: Vec<(IpAddr, u32)> = Vec::new();
    for rec in &records {
        if let RecordData::Address(ip) = rec.data
            && let Some((_, chain_ttl)) = chain.iter().find(|(n, _)| *n == rec.owner)
            && (rec.rtype == TYPE_A || rec.rtype == TYPE_AAAA)
        {
            let ttl = rec.ttl.min(*chain_ttl);
            match addresses.iter_mut().find(|(a, _)| *a == ip) {
                Some((_, t)) => *t = (*t).max(ttl),
                None => addresses.push((ip, ttl)),
            }
        }
    }
    Ok(Answer {
        question,
        addresses,
        cnames: chain.into_iter().skip(1).map(|(n, _)| n).collect(),
    })
}

/// Builders of DNS messages, for tests (here and in the lab's hostile corpus).
pub mod build {
    /// A name in wire format, uncompressed.
    pub fn name(n: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in n.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A query for `qname` of `qtype`.
    pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&0x0100u16.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend(name(qname));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    /// One answer record: owner (a name in wire format, or a pointer), type, TTL, data.
    pub fn record(owner: &[u8], rtype: u16, ttl: u32, data: &[u8]) -> Vec<u8> {
        let mut r = owner.to_vec();
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    /// An answer to `query(id, qname, qtype)` announcing `ancount` records and carrying
    /// `records` (already encoded).
    pub fn answer(id: u16, qname: &str, qtype: u16, ancount: u16, records: &[Vec<u8>]) -> Vec<u8> {
        let mut m = query(id, qname, qtype);
        m[2] = 0x81;
        m[3] = 0x80;
        m[6..8].copy_from_slice(&ancount.to_be_bytes());
        for r in records {
            m.extend_from_slice(r);
        }
        m
    }

    /// The pointer to the question's name (offset 12).
    pub const QNAME: [u8; 2] = [0xc0, 12];
}

#[cfg(test)]
mod tests {
    use super::{build::*, *};

    fn a(ip: [u8; 4]) -> Vec<u8> {
        ip.to_vec()
    }

    #[test]
    fn reads_addresses_through_a_cname_chain_with_the_smallest_ttl() {
        let msg = answer(
            7,
            "WWW.Example.COM.",
            TYPE_A,
            4,
            &[
                record(&QNAME, TYPE_CNAME, 300, &name("edge.cdn.example.net")),
                record(
                    &name("edge.cdn.example.net"),
                    TYPE_CNAME,
                    60,
                    &name("a1.cdn.example.net"),
                ),
                record(
                    &name("a1.cdn.example.net"),
                    TYPE_A,
                    600,
                    &a([203, 0, 113, 7]),
                ),
                // Not on the chain: a record about another name teaches nothing.
                record(
                    &name("evil.example.org"),
                    TYPE_A,
                    600,
                    &a([203, 0, 113, 66]),
                ),
            ],
        );
        let ans = parse_answer(&msg).unwrap();
        assert_eq!(ans.question.name, "www.example.com");
        assert_eq!(ans.question.id, 7);
        assert!(ans.question.response);
        assert_eq!(ans.cnames, ["edge.cdn.example.net", "a1.cdn.example.net"]);
        assert_eq!(ans.addresses, vec![("203.0.113.7".parse().unwrap(), 60)]);
    }

    #[test]
    fn aaaa_and_compressed_owners() {
        let mut six = [0u8; 16];
        six[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        six[15] = 9;
        let msg = answer(
            1,
            "api.example.com",
            TYPE_AAAA,
            1,
            &[record(&QNAME, TYPE_AAAA, 30, &six)],
        );
        let ans = parse_answer(&msg).unwrap();
        assert_eq!(ans.addresses, vec![("2001:db8::9".parse().unwrap(), 30)]);
    }

    #[test]
    fn hostile_messages_are_rejected() {
        // A pointer to itself, and one forwards.
        let mut looping = answer(1, "x.example.com", TYPE_A, 1, &[]);
        let at = looping.len() as u8;
        looping.extend(record(&[0xc0, at], TYPE_A, 30, &a([203, 0, 113, 1])));
        assert_eq!(parse_answer(&looping), Err(WireError::BadPointer));
        let mut forward = answer(1, "x.example.com", TYPE_A, 1, &[]);
        forward.extend(record(&[0xc0, 200], TYPE_A, 30, &a([203, 0, 113, 1])));
        assert_eq!(parse_answer(&forward), Err(WireError::BadPointer));
        // More records announced than carried.
        let short = answer(
            1,
            "x.example.com",
            TYPE_A,
            3,
            &[record(&QNAME, TYPE_A, 30, &a([203, 0, 113, 1]))],
        );
        assert_eq!(parse_answer(&short), Err(WireError::Truncated));
        // A name over 255 bytes.
        let long = format!("{}.example.com", vec!["a".repeat(60); 5].join("."));
        assert_eq!(
            parse_answer(&query(1, &long, TYPE_A)),
            Err(WireError::NameTooLong)
        );
        // A label of the reserved 0x40 type.
        let mut reserved = query(1, "x.example.com", TYPE_A);
        reserved[12] = 0x41;
        assert_eq!(parse_answer(&reserved), Err(WireError::BadLabel));
        // An A record of 5 bytes.
        let bad = answer(
            1,
            "x.example.com",
            TYPE_A,
            1,
            &[record(&QNAME, TYPE_A, 30, &[1, 2, 3, 4, 5])],
        );
        assert_eq!(parse_answer(&bad), Err(WireError::BadRecord));
        // Two questions.
        let mut two = query(1, "x.example.com", TYPE_A);
        two[5] = 2;
        assert_eq!(parse_answer(&two), Err(WireError::QuestionCount));
        // Every truncation of a good answer fails cleanly (or reads the part it can).
        let good = answer(
            1,
            "x.example.com",
            TYPE_A,
            1,
            &[record(&QNAME, TYPE_A, 30, &a([203, 0, 113, 1]))],
        );
        for n in 0..good.len() {
            assert!(parse_answer(&good[..n]).is_err(), "{n} bytes");
        }
    }

    #[test]
    fn more_records_than_announced_are_ignored() {
        let mut msg = answer(
            1,
            "x.example.com",
            TYPE_A,
            1,
            &[record(&QNAME, TYPE_A, 30, &a([203, 0, 113, 1]))],
        );
        msg.extend(record(&QNAME, TYPE_A, 30, &a([203, 0, 113, 99])));
        let ans = parse_answer(&msg).unwrap();
        assert_eq!(ans.addresses, vec![("203.0.113.1".parse().unwrap(), 30)]);
    }

    #[test]
    fn cname_loops_end() {
        let msg = answer(
            1,
            "a.example.com",
            TYPE_A,
            2,
            &[
                record(&QNAME, TYPE_CNAME, 30, &name("b.example.com")),
                record(
                    &name("b.example.com"),
                    TYPE_CNAME,
                    30,
                    &name("a.example.com"),
                ),
            ],
        );
        let ans = parse_answer(&msg).unwrap();
        assert!(ans.addresses.is_empty());
        assert_eq!(ans.cnames, ["b.example.com"]);
    }

    /// xorshift64*: a fixed seed, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Arbitrary bytes (half of them behind a plausible header), and good answers with
    /// bytes flipped and cut: never a panic or a hang, and a mutated answer never yields
    /// more addresses than it carried or a chain longer than the bound.
    #[test]
    fn fuzz_the_parser() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let good = answer(
            9,
            "api.example.com",
            TYPE_A,
            2,
            &[
                record(&QNAME, TYPE_CNAME, 30, &name("edge.example.net")),
                record(&name("edge.example.net"), TYPE_A, 30, &a([203, 0, 113, 5])),
            ],
        );
        for round in 0..200_000 {
            let msg: Vec<u8> = if round % 2 == 0 {
                let n = rng.below(600);
                let mut m: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                if round % 4 == 0 && m.len() >= 12 {
                    m[4..6].copy_from_slice(&[0, 1]);
                }
                m
            } else {
                let mut m = good.clone();
                for _ in 0..1 + rng.below(6) {
                    let at = rng.below(m.len());
                    m[at] = rng.next() as u8;
                }
                let cut = 12 + rng.below(m.len() - 11);
                m.truncate(cut);
                m
            };
            let _ = parse_question(&msg);
            if let Ok(ans) = parse_answer(&msg)
                && round % 2 == 1
            {
                assert!(ans.addresses.len() <= 2, "{msg:?}");
                assert!(ans.cnames.len() <= MAX_CHAIN);
            }
        }
    }
}
