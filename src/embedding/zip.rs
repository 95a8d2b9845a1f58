//! Minimal zip reader/writer for torch archives.
//!
//! Reading is bounded: at most [`MAX_ENTRIES`] entries, every offset checked
//! against the file, member data ranges may not overlap (overlapping members
//! are the trick behind non-recursive zip bombs), deflate output is capped at
//! the declared size and charged to the read budget first, and CRCs are checked.
//! Writing produces what torch.save produces minus the members A1111's
//! restricted loader refuses: STORED members, data aligned to 64 bytes.

use std::borrow::Cow;
use std::io::Read;

use super::{Ctx, EmbeddingError};

/// A torch archive of one embedding has < 10 members; anything near this is hostile.
pub(crate) const MAX_ENTRIES: usize = 1024;
/// Best possible deflate ratio is ~1032:1; a larger declared ratio is a bomb or a lie.
const MAX_DEFLATE_RATIO: u64 = 1032;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LOC_SIG: u32 = 0x0706_4b50;

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    method: u16,
    crc: u32,
    comp_size: u64,
    uncomp_size: u64,
    data_start: u64,
}

pub(crate) struct Archive<'a> {
    bytes: &'a [u8],
    pub(crate) entries: Vec<Entry>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

impl Entry {
    pub(crate) fn stored(&self) -> bool {
        self.method == 0
    }
}

/// One central-directory record, before its local header is checked.
struct Central<'c> {
    name: String,
    name_bytes: &'c [u8],
    flags: u16,
    method: u16,
    crc: u32,
    comp_size: u64,
    uncomp_size: u64,
    local: u64,
    /// Bytes the record takes in the directory.
    len: usize,
}

/// What the end-of-central-directory record (or its zip64 twin) says.
struct Directory {
    count: u64,
    size: u64,
    offset: u64,
}

const DIRECTORY_FIELD: &str = "zip directory";

impl<'a> Archive<'a> {
    pub(crate) fn parse(ctx: &Ctx, bytes: &'a [u8]) -> Result<Archive<'a>, EmbeddingError> {
        let field = DIRECTORY_FIELD;
        let trunc = |what: &str| ctx.truncated(field, what.to_string());
        let eocd = find_end_record(ctx, bytes)?;
        let Directory {
            count,
            size: cd_size,
            offset: cd_off,
        } = read_directory_extent(ctx, bytes, eocd)?;
        if count as usize > MAX_ENTRIES || count > MAX_ENTRIES as u64 {
            return Err(ctx.invalid(
                field,
                format!("{count} members; a learned-embedding archive has a handful (limit {MAX_ENTRIES})"),
            ));
        }
        let cd_end = cd_off
            .checked_add(cd_size)
            .filter(|e| *e <= eocd as u64)
            .ok_or_else(|| trunc("central directory runs past the end record"))?;
        let cd = &bytes[cd_off as usize..cd_end as usize];
        let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
        let mut p = 0usize;
        for i in 0..count {
            let c = read_central(ctx, cd, p, i)?;
            p += c.len;
            check_member(ctx, &c)?;
            let data_start = local_data_start(ctx, bytes, &c, cd_off, i)?;
            if entries.iter().any(|x| x.name == c.name) {
                return Err(ctx.invalid(
                    format!("member {}", c.name),
                    "duplicate member name (ambiguous archive)",
                ));
            }
            entries.push(Entry {
                name: c.name,
                method: c.method,
                crc: c.crc,
                comp_size: c.comp_size,
                uncomp_size: c.uncomp_size,
                data_start,
            });
        }
        let mut spans: Vec<(u64, u64)> = entries
            .iter()
            .map(|e| (e.data_start, e.data_start + e.comp_size))
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(ctx.invalid(field, "member data overlaps another member's: a zip bomb"));
        }
        Ok(Archive { bytes, entries })
    }

    pub(crate) fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Member contents, decompressed within the budget and CRC-checked.
    pub(crate) fn read(&self, ctx: &Ctx, e: &Entry) -> Result<Cow<'a, [u8]>, EmbeddingError> {
        let field = format!("member {}", e.name);
        // Offsets were validated in parse().
        let raw = self
            .bytes
            .get(e.data_start as usize..(e.data_start + e.comp_size) as usize)
            .ok_or_else(|| ctx.truncated(&field, "data outside the file"))?;
        let data: Cow<'a, [u8]> = if e.method == 0 {
            Cow::Borrowed(raw)
        } else {
            ctx.charge(e.uncomp_size.saturating_add(1), &field)?;
            // +1 so the overflow probe byte never forces a reallocation.
            let mut out = Vec::with_capacity(e.uncomp_size as usize + 1);
            flate2::read::DeflateDecoder::new(raw)
                .take(e.uncomp_size.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|err| ctx.invalid(&field, format!("deflate stream is corrupt: {err}")))?;
            if out.len() as u64 != e.uncomp_size {
                return Err(ctx.invalid(
                    &field,
                    format!(
                        "inflates to {}{} bytes, declared {}",
                        out.len(),
                        if out.len() as u64 > e.uncomp_size {
                            "+"
                        } else {
                            ""
                        },
                        e.uncomp_size
                    ),
                ));
            }
            Cow::Owned(out)
        };
        let mut crc = flate2::Crc::new();
        crc.update(&data);
        if crc.sum() != e.crc {
            return Err(ctx.invalid(
                &field,
                format!(
                    "CRC mismatch ({:08x} vs {:08x}): the file is corrupt",
                    crc.sum(),
                    e.crc
                ),
            ));
        }
        Ok(data)
    }
}

/// Offset of the end-of-central-directory record: searched backwards through
/// the last 22 + 65535 (max comment) bytes, and only where its comment ends the file.
fn find_end_record(ctx: &Ctx, bytes: &[u8]) -> Result<usize, EmbeddingError> {
    let trunc = |what: &str| ctx.truncated(DIRECTORY_FIELD, what.to_string());
    if bytes.len() < 22 {
        return Err(trunc("shorter than a zip end record"));
    }
    let lowest = bytes.len().saturating_sub(22 + 0xFFFF);
    let mut at = bytes.len() - 22;
    loop {
        if u32_at(bytes, at) == Some(EOCD_SIG) {
            let comment = u16_at(bytes, at + 20).unwrap_or(0) as usize;
            if at + 22 + comment == bytes.len() {
                return Ok(at);
            }
        }
        if at == lowest {
            break;
        }
        at -= 1;
    }
    Err(trunc(
        "no end-of-central-directory record (file cut short or not a zip)",
    ))
}

/// Member count, size and offset of the central directory, from the zip64 end
/// record when the classic one is saturated.
fn read_directory_extent(
    ctx: &Ctx,
    bytes: &[u8],
    eocd: usize,
) -> Result<Directory, EmbeddingError> {
    let trunc = |what: &str| ctx.truncated(DIRECTORY_FIELD, what.to_string());
    let count = u16_at(bytes, eocd + 10).unwrap_or(0) as u64;
    let size = u32_at(bytes, eocd + 12).unwrap_or(0) as u64;
    let offset = u32_at(bytes, eocd + 16).unwrap_or(0) as u64;
    if count != 0xFFFF && size != 0xFFFF_FFFF && offset != 0xFFFF_FFFF {
        return Ok(Directory {
            count,
            size,
            offset,
        });
    }
    // zip64: torch always writes the records; only needed when saturated.
    let loc = eocd
        .checked_sub(20)
        .filter(|l| u32_at(bytes, *l) == Some(EOCD64_LOC_SIG))
        .ok_or_else(|| trunc("zip64 locator missing"))?;
    let rec = u64_at(bytes, loc + 8).ok_or_else(|| trunc("zip64 locator cut short"))?;
    let rec = usize::try_from(rec)
        .ok()
        .filter(|r| u32_at(bytes, *r) == Some(EOCD64_SIG))
        .ok_or_else(|| ctx.invalid(DIRECTORY_FIELD, "zip64 end record offset is wrong"))?;
    Ok(Directory {
        count: u64_at(bytes, rec + 32).ok_or_else(|| trunc("zip64 end record cut short"))?,
        size: u64_at(bytes, rec + 40).ok_or_else(|| trunc("zip64 end record cut short"))?,
        offset: u64_at(bytes, rec + 48).ok_or_else(|| trunc("zip64 end record cut short"))?,
    })
}

/// Central entry `i`, at `p` in the directory `cd`, with its zip64 extended sizes applied.
fn read_central<'c>(
    ctx: &Ctx,
    cd: &'c [u8],
    p: usize,
    i: u64,
) -> Result<Central<'c>, EmbeddingError> {
    let bad = |what: &str| ctx.truncated(DIRECTORY_FIELD, format!("central entry {i}: {what}"));
    if u32_at(cd, p) != Some(CENTRAL_SIG) {
        return Err(bad("missing signature"));
    }
    let flags = u16_at(cd, p + 8).ok_or_else(|| bad("cut short"))?;
    let method = u16_at(cd, p + 10).ok_or_else(|| bad("cut short"))?;
    let crc = u32_at(cd, p + 16).ok_or_else(|| bad("cut short"))?;
    let mut comp_size = u32_at(cd, p + 20).ok_or_else(|| bad("cut short"))? as u64;
    let mut uncomp_size = u32_at(cd, p + 24).ok_or_else(|| bad("cut short"))? as u64;
    let name_len = u16_at(cd, p + 28).ok_or_else(|| bad("cut short"))? as usize;
    let extra_len = u16_at(cd, p + 30).ok_or_else(|| bad("cut short"))? as usize;
    let comment_len = u16_at(cd, p + 32).ok_or_else(|| bad("cut short"))? as usize;
    let mut local = u32_at(cd, p + 42).ok_or_else(|| bad("cut short"))? as u64;
    let name_bytes = cd
        .get(p + 46..p + 46 + name_len)
        .ok_or_else(|| bad("name cut short"))?;
    let name = std::str::from_utf8(name_bytes)
        .map_err(|_| {
            ctx.invalid(
                DIRECTORY_FIELD,
                format!("central entry {i}: name is not UTF-8"),
            )
        })?
        .to_string();
    let extra = cd
        .get(p + 46 + name_len..p + 46 + name_len + extra_len)
        .ok_or_else(|| bad("extra field cut short"))?;
    // zip64 extended sizes, in the order of the saturated fields.
    let mut e = 0usize;
    while e + 4 <= extra.len() {
        let id = u16_at(extra, e).unwrap_or(0);
        let len = u16_at(extra, e + 2).unwrap_or(0) as usize;
        if id == 1 {
            let mut q = e + 4;
            for v in [&mut uncomp_size, &mut comp_size, &mut local] {
                if *v == 0xFFFF_FFFF {
                    *v = u64_at(extra, q).ok_or_else(|| bad("zip64 extra cut short"))?;
                    q += 8;
                }
            }
        }
        e += 4 + len;
    }
    Ok(Central {
        name,
        name_bytes,
        flags,
        method,
        crc,
        comp_size,
        uncomp_size,
        local,
        len: 46 + name_len + extra_len + comment_len,
    })
}

/// Refuses what no torch archive holds: encryption, other compressions, and
/// sizes that cannot be true.
fn check_member(ctx: &Ctx, c: &Central) -> Result<(), EmbeddingError> {
    let (name, method) = (&c.name, c.method);
    let (comp_size, uncomp_size) = (c.comp_size, c.uncomp_size);
    if c.flags & 1 != 0 {
        return Err(ctx.invalid(
            format!("member {name}"),
            "encrypted zip members are not supported",
        ));
    }
    if method != 0 && method != 8 {
        return Err(ctx.invalid(
            format!("member {name}"),
            format!("compression method {method}; only stored (0) and deflate (8) are supported"),
        ));
    }
    if method == 0 && comp_size != uncomp_size {
        return Err(ctx.invalid(
            format!("member {name}"),
            "stored member with differing sizes",
        ));
    }
    if method == 8
        && uncomp_size
            > comp_size
                .saturating_mul(MAX_DEFLATE_RATIO)
                .saturating_add(64)
    {
        return Err(ctx.invalid(
            format!("member {name}"),
            format!("declares {uncomp_size} bytes from {comp_size} compressed: a zip bomb"),
        ));
    }
    Ok(())
}

/// Where member data starts, after its local header (fixed 30 bytes, then its
/// own name/extra lengths), which must agree with the central entry and end
/// before the central directory at `cd_off`.
fn local_data_start(
    ctx: &Ctx,
    bytes: &[u8],
    c: &Central,
    cd_off: u64,
    i: u64,
) -> Result<u64, EmbeddingError> {
    let bad = |what: &str| ctx.truncated(DIRECTORY_FIELD, format!("central entry {i}: {what}"));
    let (name, local, comp_size) = (&c.name, c.local, c.comp_size);
    let lh = usize::try_from(local).map_err(|_| bad("local header offset overflows"))?;
    if u32_at(bytes, lh) != Some(LOCAL_SIG) || local >= cd_off {
        return Err(ctx.truncated(
            format!("member {name}"),
            "local header missing or outside the data area",
        ));
    }
    let lname = u16_at(bytes, lh + 26).ok_or_else(|| bad("local header cut short"))? as u64;
    let lextra = u16_at(bytes, lh + 28).ok_or_else(|| bad("local header cut short"))? as u64;
    if bytes.get(lh + 30..lh + 30 + lname as usize) != Some(c.name_bytes) {
        return Err(ctx.invalid(
            format!("member {name}"),
            "local header name differs from the central directory (ambiguous archive)",
        ));
    }
    let data_start = local + 30 + lname + lextra;
    if data_start
        .checked_add(comp_size)
        .is_none_or(|end| end > cd_off)
    {
        return Err(ctx.truncated(
            format!("member {name}"),
            format!("{comp_size} bytes of data run past the end of the archive data"),
        ));
    }
    Ok(data_start)
}

/// Writes a STORED zip whose member data starts on 64-byte boundaries (as
/// torch's writer does, so torch can mmap it).
pub(crate) fn write_stored(members: &[(String, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in members {
        let offset = out.len() as u32;
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let header_end = out.len() + 30 + name.len();
        // Pad with torch's "FB" extra field so data is 64-byte aligned.
        let pad = (64 - (header_end + 4) % 64) % 64;
        let local = |buf: &mut Vec<u8>, sig: u32| {
            buf.extend_from_slice(&sig.to_le_bytes());
        };
        local(&mut out, LOCAL_SIG);
        out.extend_from_slice(&20u16.to_le_bytes()); // version needed
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&0u16.to_le_bytes()); // stored
        out.extend_from_slice(&0u16.to_le_bytes()); // time
        out.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"FB");
        out.extend_from_slice(&(pad as u16).to_le_bytes());
        out.extend(std::iter::repeat_n(b'Z', pad));
        out.extend_from_slice(data);

        local(&mut central, CENTRAL_SIG);
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        central.extend_from_slice(&20u16.to_le_bytes()); // needed
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0x21u16.to_le_bytes());
        central.extend_from_slice(&crc.sum().to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(data.len() as u32).to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes()); // extra
        central.extend_from_slice(&0u16.to_le_bytes()); // comment
        central.extend_from_slice(&0u16.to_le_bytes()); // disk
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
        central.extend_from_slice(&0u32.to_le_bytes()); // external attrs
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    let cd_len = central.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&EOCD_SIG.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&cd_len.to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}
