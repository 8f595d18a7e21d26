//! Log sequence numbers, printed and parsed as PostgreSQL does (`16/B374D848`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A WAL position. Ordered like the WAL; `Lsn(0)` is PostgreSQL's `InvalidXLogRecPtr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    /// Appends `X/X` (upper-case hex, no padding) to `buf`, without allocating.
    pub fn write_to(self, buf: &mut Vec<u8>) {
        write_hex(buf, self.0 >> 32);
        buf.push(b'/');
        write_hex(buf, self.0 & 0xFFFF_FFFF);
    }
}

fn write_hex(buf: &mut Vec<u8>, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    if v == 0 {
        buf.push(b'0');
        return;
    }
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    let mut v = v;
    while v > 0 {
        i -= 1;
        tmp[i] = DIGITS[(v & 0xF) as usize];
        v >>= 4;
    }
    buf.extend_from_slice(&tmp[i..]);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || Error::InvalidLsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lsn_prints_like_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        let mut b = Vec::new();
        Lsn(0x16_B374_D848).write_to(&mut b);
        assert_eq!(b, b"16/B374D848");
    }

    #[test]
    fn bad_lsn_text_is_refused() {
        for s in ["", "1", "/1", "1/", "G/1", "1/2/3", "123456789/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s}");
        }
    }

    proptest! {
        #[test]
        fn lsn_text_round_trips(v in any::<u64>()) {
            let l = Lsn(v);
            let mut b = Vec::new();
            l.write_to(&mut b);
            prop_assert_eq!(std::str::from_utf8(&b).unwrap(), l.to_string());
            prop_assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
        }
    }
}
