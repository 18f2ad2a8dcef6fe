//! HAST metadata on the local provider: the 4096-byte nv block at offset 0
//! (resource, datasize, extentsize, keepdirty, offset, resuid, localcnt,
//! remotecnt, prevrole), the activemap that follows it, the layout rules of
//! `hastctl create` and the text of `hastctl dump`. Byte-compatible with
//! FreeBSD's metadata.c, so an existing HAST provider is taken over as is.

use crate::activemap::{self, DiskMap};
use crate::nv::{Nv, NvError};
use crate::provider::{Provider, ProviderError};
use crate::role::Role;
use crate::size::humanize;
use crate::sysexits::{EX_DATAERR, EX_IOERR, EX_NOINPUT};

/// Size of the metadata block at the start of the provider.
pub const METADATA_SIZE: u64 = 4096;

/// Default extent size of `hastctl create` (2 MiB).
pub const DEFAULT_EXTENTSIZE: u32 = 2 * 1024 * 1024;

/// Default number of extents kept dirty (`hastctl create -k`).
pub const DEFAULT_KEEPDIRTY: u32 = 64;

/// Largest extent size: the replication handshake carries it as an int32.
pub const MAX_EXTENTSIZE: u64 = 1 << 30;

/// Largest keepdirty: the reference keeps it in an int.
pub const MAX_KEEPDIRTY: u64 = i32::MAX as u64;

/// Largest sector rounding accepted for the activemap area on read.
const MAX_MAP_SLACK: u64 = 1 << 20;

/// The metadata of one resource, as stored on its local provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub resource: String,
    pub datasize: u64,
    pub extentsize: u32,
    pub keepdirty: u32,
    pub localoff: u64,
    pub resuid: u64,
    pub localcnt: u64,
    pub remotecnt: u64,
    pub prevrole: Role,
    /// Extension: a synchronization toward this copy started and has not
    /// finished, so it mixes old and new blocks (nv `syncing`, uint8 1,
    /// written only while set; FreeBSD's hastd ignores it).
    pub syncing: bool,
}

/// The nv field of [`Metadata::syncing`].
pub const SYNCING_FIELD: &str = "syncing";

/// What `hastctl dump` and `list` print (indented) for a copy whose
/// [`Metadata::syncing`] is set.
pub const INCONSISTENT_LINE: &str =
    "inconsistent: yes (a synchronization from the peer did not finish)";

/// The geometry `hastctl create` computes for a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mediasize: u64,
    pub sectorsize: u32,
    pub extentsize: u32,
    pub keepdirty: u32,
    pub mapsize: u64,
    pub localoff: u64,
    pub datasize: u64,
}

/// Why metadata could not be computed, read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("provided mediasize ({requested}) is larger than {} size ({available})", provider_named(path.as_deref()))]
    MediasizeTooLarge {
        /// The provider, when known (not to [`Layout::compute`]).
        path: Option<String>,
        requested: u64,
        available: u64,
    },
    #[error("sector size of provider is not a power of 2 ({0})")]
    BadSectorSize(u32),
    #[error("extent size ({extentsize}) is less than sector size ({sectorsize})")]
    ExtentTooSmall { extentsize: u64, sectorsize: u32 },
    #[error("extent size ({extentsize}) is not multiple of sector size ({sectorsize})")]
    ExtentNotMultiple { extentsize: u64, sectorsize: u32 },
    #[error("extent size ({0}) is not a power of 2")]
    ExtentNotPowerOfTwo(u64),
    #[error("extent size ({extentsize}) is larger than the maximum ({max})")]
    ExtentTooLarge { extentsize: u64, max: u64 },
    #[error("keepdirty ({keepdirty}) is larger than the maximum ({max})")]
    KeepdirtyTooLarge { keepdirty: u64, max: u64 },
    #[error("mediasize ({mediasize}) is too small: {needed} bytes are needed for metadata ({METADATA_SIZE}), the activemap ({mapsize}) and one extent ({extentsize})")]
    TooSmall {
        mediasize: u64,
        needed: u64,
        mapsize: u64,
        extentsize: u32,
    },
    #[error(
        "resource name {0:?} cannot be stored in metadata (empty, contains a NUL or too long)"
    )]
    BadResourceName(String),
    #[error("provider {path}: {source}")]
    Provider {
        path: String,
        #[source]
        source: ProviderError,
    },
    #[error("provider {path} is smaller than the {METADATA_SIZE}-byte metadata block ({mediasize} bytes)")]
    ProviderTooSmall { path: String, mediasize: u64 },
    #[error("provider {path} has no HAST metadata (run hastctl create {resource})")]
    NoMetadata { path: String, resource: String },
    #[error("metadata read from {path} is invalid: {source}")]
    Invalid {
        path: String,
        #[source]
        source: NvError,
    },
    #[error("metadata read from {path} is invalid: field {field:?} is missing or not a {ty}")]
    MissingField {
        path: String,
        field: &'static str,
        ty: &'static str,
    },
    #[error("metadata read from {path} is invalid: {field} = {value} ({why})")]
    BadValue {
        path: String,
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("provider {path} is not part of resource {expected} (it belongs to {found:?})")]
    ResourceMismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("metadata of resource {resource} does not fit provider {path}: data ends at {end}, provider size is {mediasize}")]
    DoesNotFit {
        path: String,
        resource: String,
        end: u64,
        mediasize: u64,
    },
    #[error(
        "activemap of {len} bytes does not fit the {mapsize}-byte map area of resource {resource}"
    )]
    MapTooLarge {
        resource: String,
        len: usize,
        mapsize: u64,
    },
    #[error("cannot encode metadata of resource {resource}: {why}")]
    Encode { resource: String, why: String },
}

/// "provider PATH" in messages, or "the provider" when the path is unknown.
fn provider_named(path: Option<&str>) -> String {
    match path {
        Some(p) => format!("provider {p}"),
        None => "the provider".to_string(),
    }
}

impl MetadataError {
    /// hastctl's exit code for this error: 65 (EX_DATAERR) for bad sizes and
    /// invalid metadata, 66 (EX_NOINPUT) when the provider cannot be opened,
    /// 74 (EX_IOERR) for I/O errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            MetadataError::Provider { source, .. } if source.is_open_error() => EX_NOINPUT,
            MetadataError::Provider { .. } => EX_IOERR,
            _ => EX_DATAERR,
        }
    }

    fn provider(p: &Provider, source: ProviderError) -> MetadataError {
        MetadataError::Provider {
            path: p.path().display().to_string(),
            source,
        }
    }
}

fn ensure_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Layout {
    /// hastctl create's rules. `None` or `Some(0)` selects the default (the
    /// reference treats 0 as "not given"): mediasize = the whole provider,
    /// extentsize = 2 MiB, keepdirty = 64. The requested mediasize must not
    /// exceed the provider; the sector size must be a power of two; the
    /// extent size must be at least and a multiple of the sector size, a
    /// power of two (the reference crashes otherwise) and at most 1 GiB (it
    /// travels as an int32). mapsize = activemap on-disk size for
    /// (mediasize - 4096), datasize = mediasize - 4096 - mapsize,
    /// localoff = 4096 + mapsize, and datasize must hold at least one
    /// extent.
    pub fn compute(
        provider_mediasize: u64,
        sectorsize: u32,
        mediasize: Option<u64>,
        extentsize: Option<u64>,
        keepdirty: Option<u64>,
    ) -> Result<Layout, MetadataError> {
        let mediasize = match mediasize {
            None | Some(0) => provider_mediasize,
            Some(m) if m > provider_mediasize => {
                return Err(MetadataError::MediasizeTooLarge {
                    path: None,
                    requested: m,
                    available: provider_mediasize,
                })
            }
            Some(m) => m,
        };
        if !sectorsize.is_power_of_two() {
            return Err(MetadataError::BadSectorSize(sectorsize));
        }
        let ext = match extentsize {
            None | Some(0) => u64::from(DEFAULT_EXTENTSIZE),
            Some(e) => e,
        };
        if ext < u64::from(sectorsize) {
            return Err(MetadataError::ExtentTooSmall {
                extentsize: ext,
                sectorsize,
            });
        }
        if ext % u64::from(sectorsize) != 0 {
            return Err(MetadataError::ExtentNotMultiple {
                extentsize: ext,
                sectorsize,
            });
        }
        if !ext.is_power_of_two() {
            return Err(MetadataError::ExtentNotPowerOfTwo(ext));
        }
        if ext > MAX_EXTENTSIZE {
            return Err(MetadataError::ExtentTooLarge {
                extentsize: ext,
                max: MAX_EXTENTSIZE,
            });
        }
        let extentsize = ensure_u32(ext);
        let keepdirty = match keepdirty {
            None | Some(0) => DEFAULT_KEEPDIRTY,
            Some(k) if k > MAX_KEEPDIRTY => {
                return Err(MetadataError::KeepdirtyTooLarge {
                    keepdirty: k,
                    max: MAX_KEEPDIRTY,
                })
            }
            Some(k) => ensure_u32(k),
        };
        let too_small = |mapsize: u64| MetadataError::TooSmall {
            mediasize,
            needed: METADATA_SIZE
                .saturating_add(mapsize)
                .saturating_add(u64::from(extentsize)),
            mapsize,
            extentsize,
        };
        let avail = match mediasize.checked_sub(METADATA_SIZE) {
            Some(a) if a > 0 => a,
            _ => return Err(too_small(u64::from(sectorsize))),
        };
        let mapsize = activemap::ondisk_size(avail, extentsize, sectorsize);
        let datasize = match avail.checked_sub(mapsize) {
            Some(d) if d >= u64::from(extentsize) => d,
            _ => return Err(too_small(mapsize)),
        };
        if datasize > i64::MAX as u64 {
            return Err(MetadataError::BadValue {
                path: String::new(),
                field: "datasize",
                value: datasize.to_string(),
                why: "larger than the protocol's int64",
            });
        }
        Ok(Layout {
            mediasize,
            sectorsize,
            extentsize,
            keepdirty,
            mapsize,
            localoff: METADATA_SIZE + mapsize,
            datasize,
        })
    }
}

impl Layout {
    /// [`Layout::compute`] for an open provider (its size and sector size);
    /// errors name the provider.
    pub fn for_provider(
        p: &Provider,
        mediasize: Option<u64>,
        extentsize: Option<u64>,
        keepdirty: Option<u64>,
    ) -> Result<Layout, MetadataError> {
        let path = p.path().display().to_string();
        Layout::compute(
            p.mediasize(),
            p.sectorsize(),
            mediasize,
            extentsize,
            keepdirty,
        )
        .map_err(|e| match e {
            MetadataError::MediasizeTooLarge {
                requested,
                available,
                ..
            } => MetadataError::MediasizeTooLarge {
                path: Some(path),
                requested,
                available,
            },
            other => other,
        })
    }
}

fn valid_resource_name(name: &str) -> bool {
    // The name must leave room for the rest of the block; the reference
    // limits it much further (hr_name is 64 bytes).
    !name.is_empty() && !name.as_bytes().contains(&0) && name.len() <= 1024
}

impl Metadata {
    /// Bytes of the activemap area on disk (localoff - 4096).
    pub fn mapsize(&self) -> u64 {
        self.localoff.saturating_sub(METADATA_SIZE)
    }

    /// Number of extents of the data area.
    pub fn nextents(&self) -> u64 {
        activemap::nextents(self.datasize, self.extentsize)
    }

    /// The metadata as the nv list the reference writes (same order, types).
    pub fn to_nv(&self) -> Result<Nv, MetadataError> {
        let prevrole = match self.prevrole {
            Role::Init | Role::Primary | Role::Secondary => self.prevrole.as_str(),
            Role::Undef => {
                return Err(MetadataError::Encode {
                    resource: self.resource.clone(),
                    why: "prevrole is undef".to_string(),
                })
            }
        };
        let mut nv = Nv::new();
        nv.add_string("resource", self.resource.clone())
            .add_u64("datasize", self.datasize)
            .add_u32("extentsize", self.extentsize)
            .add_u32("keepdirty", self.keepdirty)
            .add_u64("offset", self.localoff)
            .add_u64("resuid", self.resuid)
            .add_u64("localcnt", self.localcnt)
            .add_u64("remotecnt", self.remotecnt)
            .add_string("prevrole", prevrole);
        if self.syncing {
            nv.add_u8(SYNCING_FIELD, 1);
        }
        Ok(nv)
    }

    /// The 4096-byte metadata block, zero padded.
    pub fn encode(&self) -> Result<Vec<u8>, MetadataError> {
        if !valid_resource_name(&self.resource) {
            return Err(MetadataError::BadResourceName(self.resource.clone()));
        }
        let bytes = self.to_nv()?.encode().map_err(|e| MetadataError::Encode {
            resource: self.resource.clone(),
            why: e.to_string(),
        })?;
        // The reference requires the list to end before the block does, so
        // that a zero byte terminates it.
        if bytes.len() as u64 >= METADATA_SIZE {
            return Err(MetadataError::Encode {
                resource: self.resource.clone(),
                why: format!("{} bytes do not fit in {METADATA_SIZE}", bytes.len()),
            });
        }
        let mut block = vec![0u8; METADATA_SIZE as usize];
        if let Some(dst) = block.get_mut(..bytes.len()) {
            dst.copy_from_slice(&bytes);
        }
        Ok(block)
    }

    /// Decodes a metadata block for resource `expected_resource`. Every field
    /// must be present with the reference's type (the reference fails on a
    /// missing one too); values are checked for sanity.
    pub fn decode(buf: &[u8], expected_resource: &str) -> Result<Metadata, MetadataError> {
        Self::decode_from(buf, expected_resource, "")
    }

    fn decode_from(buf: &[u8], expected: &str, path: &str) -> Result<Metadata, MetadataError> {
        let path_s = || path.to_string();
        let block = buf.get(..METADATA_SIZE as usize).unwrap_or(buf);
        if block.first().copied().unwrap_or(0) == 0 {
            return Err(MetadataError::NoMetadata {
                path: path_s(),
                resource: expected.to_string(),
            });
        }
        let nv = Nv::decode(block).map_err(|source| MetadataError::Invalid {
            path: path_s(),
            source,
        })?;
        let missing = |field: &'static str, ty: &'static str| MetadataError::MissingField {
            path: path_s(),
            field,
            ty,
        };
        let resource = nv
            .get_string("resource")
            .ok_or_else(|| missing("resource", "string"))?;
        if resource != expected {
            return Err(MetadataError::ResourceMismatch {
                path: path_s(),
                expected: expected.to_string(),
                found: resource.to_string(),
            });
        }
        let u64f = |f: &'static str| nv.get_u64(f).ok_or_else(|| missing(f, "uint64"));
        let u32f = |f: &'static str| nv.get_u32(f).ok_or_else(|| missing(f, "uint32"));
        let md = Metadata {
            resource: resource.to_string(),
            datasize: u64f("datasize")?,
            extentsize: u32f("extentsize")?,
            keepdirty: u32f("keepdirty")?,
            localoff: u64f("offset")?,
            resuid: u64f("resuid")?,
            localcnt: u64f("localcnt")?,
            remotecnt: u64f("remotecnt")?,
            prevrole: match nv.get_string("prevrole") {
                Some("init") => Role::Init,
                Some("primary") => Role::Primary,
                Some("secondary") => Role::Secondary,
                Some(other) => {
                    return Err(MetadataError::BadValue {
                        path: path_s(),
                        field: "prevrole",
                        value: other.to_string(),
                        why: "expected init, primary or secondary",
                    })
                }
                None => return Err(missing("prevrole", "string")),
            },
            syncing: nv.get_u8(SYNCING_FIELD) == Some(1),
        };
        md.validate(path)?;
        Ok(md)
    }

    fn validate(&self, path: &str) -> Result<(), MetadataError> {
        let bad = |field: &'static str, value: u64, why: &'static str| MetadataError::BadValue {
            path: path.to_string(),
            field,
            value: value.to_string(),
            why,
        };
        let ext = u64::from(self.extentsize);
        if !self.extentsize.is_power_of_two() || ext > MAX_EXTENTSIZE {
            return Err(bad("extentsize", ext, "not a power of two up to 1 GiB"));
        }
        if self.keepdirty == 0 || u64::from(self.keepdirty) > MAX_KEEPDIRTY {
            return Err(bad("keepdirty", self.keepdirty.into(), "must be 1..2^31-1"));
        }
        if self.datasize == 0 || self.datasize > i64::MAX as u64 {
            return Err(bad("datasize", self.datasize, "must be 1..2^63-1"));
        }
        let need = activemap::bitmap_size(self.nextents());
        if self.localoff < METADATA_SIZE || self.mapsize() < need {
            return Err(bad(
                "offset",
                self.localoff,
                "leaves no room for the activemap",
            ));
        }
        // hastctl create makes the map area the bitmap rounded up to a
        // sector; anything far larger is corruption (and must not make us
        // allocate it).
        if self.mapsize() > need.saturating_mul(2).saturating_add(MAX_MAP_SLACK) {
            return Err(bad(
                "offset",
                self.localoff,
                "activemap area far larger than the data needs",
            ));
        }
        match self.localoff.checked_add(self.datasize) {
            Some(end) if end <= i64::MAX as u64 => Ok(()),
            _ => Err(bad("offset", self.localoff, "data would end past 2^63")),
        }
    }

    /// Reads and validates the metadata of `expected_resource` from `p`, and
    /// checks that the data area fits the provider.
    pub fn read(p: &Provider, expected_resource: &str) -> Result<Metadata, MetadataError> {
        let path = p.path().display().to_string();
        if p.mediasize() < METADATA_SIZE {
            return Err(MetadataError::ProviderTooSmall {
                path,
                mediasize: p.mediasize(),
            });
        }
        let mut buf = vec![0u8; METADATA_SIZE as usize];
        p.read_exact_at(&mut buf, 0)
            .map_err(|e| MetadataError::provider(p, e))?;
        let md = Self::decode_from(&buf, expected_resource, &path)?;
        let end = md.localoff.saturating_add(md.datasize);
        if end > p.mediasize() {
            return Err(MetadataError::DoesNotFit {
                path,
                resource: md.resource,
                end,
                mediasize: p.mediasize(),
            });
        }
        Ok(md)
    }

    /// Writes the metadata block at offset 0 (then fdatasync if `flush`).
    pub fn write(&self, p: &Provider, flush: bool) -> Result<(), MetadataError> {
        let block = self.encode()?;
        p.write_all_at(&block, 0)
            .map_err(|e| MetadataError::provider(p, e))?;
        if flush {
            p.flush().map_err(|e| MetadataError::provider(p, e))?;
        }
        Ok(())
    }

    /// Reads the on-disk activemap (mapsize bytes at offset 4096).
    pub fn read_map(&self, p: &Provider) -> Result<DiskMap, MetadataError> {
        let mapsize = self.mapsize();
        if METADATA_SIZE.saturating_add(mapsize) > p.mediasize() {
            return Err(MetadataError::DoesNotFit {
                path: p.path().display().to_string(),
                resource: self.resource.clone(),
                end: METADATA_SIZE.saturating_add(mapsize),
                mediasize: p.mediasize(),
            });
        }
        let len = usize::try_from(mapsize).map_err(|_| MetadataError::MapTooLarge {
            resource: self.resource.clone(),
            len: usize::MAX,
            mapsize,
        })?;
        let mut buf = vec![0u8; len];
        p.read_exact_at(&mut buf, METADATA_SIZE)
            .map_err(|e| MetadataError::provider(p, e))?;
        Ok(DiskMap::from_bytes(buf, self.nextents()))
    }

    /// Writes `map` at offset 4096, zero-filling the rest of the map area
    /// (then fdatasync if `flush`).
    pub fn write_map(&self, p: &Provider, map: &DiskMap, flush: bool) -> Result<(), MetadataError> {
        let mapsize = self.mapsize();
        let bytes = map.as_bytes();
        if bytes.len() as u64 > mapsize {
            return Err(MetadataError::MapTooLarge {
                resource: self.resource.clone(),
                len: bytes.len(),
                mapsize,
            });
        }
        if bytes.len() as u64 == mapsize {
            p.write_all_at(bytes, METADATA_SIZE)
        } else {
            let mut full = bytes.to_vec();
            full.resize(usize::try_from(mapsize).unwrap_or(bytes.len()), 0);
            p.write_all_at(&full, METADATA_SIZE)
        }
        .map_err(|e| MetadataError::provider(p, e))?;
        if flush {
            p.flush().map_err(|e| MetadataError::provider(p, e))?;
        }
        Ok(())
    }
}

/// hastctl create: writes metadata for `resource` (resuid 0, counters 0,
/// prevrole init) and a zeroed activemap, flushes, and returns it.
pub fn create(p: &Provider, resource: &str, layout: &Layout) -> Result<Metadata, MetadataError> {
    if !valid_resource_name(resource) {
        return Err(MetadataError::BadResourceName(resource.to_string()));
    }
    if layout.mediasize > p.mediasize() {
        return Err(MetadataError::MediasizeTooLarge {
            path: Some(p.path().display().to_string()),
            requested: layout.mediasize,
            available: p.mediasize(),
        });
    }
    let md = Metadata {
        resource: resource.to_string(),
        datasize: layout.datasize,
        extentsize: layout.extentsize,
        keepdirty: layout.keepdirty,
        localoff: layout.localoff,
        resuid: 0,
        localcnt: 0,
        remotecnt: 0,
        prevrole: Role::Init,
        syncing: false,
    };
    md.validate(&p.path().display().to_string())?;
    md.write(p, false)?;
    let map = DiskMap::new(md.nextents(), md.mapsize());
    md.write_map(p, &map, true)?;
    Ok(md)
}

/// The text `hastctl dump` prints for one resource.
pub fn dump_text(md: &Metadata) -> String {
    let mut text = format!(
        "resource: {}\n    datasize: {} ({}B)\n    extentsize: {} ({}B)\n    keepdirty: {}\n    localoff: {}\n    resuid: {}\n    localcnt: {}\n    remotecnt: {}\n    prevrole: {}\n",
        md.resource,
        md.datasize,
        humanize(md.datasize),
        md.extentsize,
        humanize(u64::from(md.extentsize)),
        md.keepdirty,
        md.localoff,
        md.resuid,
        md.localcnt,
        md.remotecnt,
        md.prevrole.as_str(),
    );
    // An extension, after the reference's lines and only when set.
    if md.syncing {
        text.push_str(&format!("    {INCONSISTENT_LINE}\n"));
    }
    text
}
