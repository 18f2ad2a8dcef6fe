//! Writes the seed inputs of every fuzz target into `<dir>/<target>/`
//! (default `fuzz/seeds`), from the project's test vectors: the messages
//! FreeBSD's hastd sends as tests/src/freebsd.rs describes them (a first
//! frame of version 1, the geometry with a hole-compressed map), the
//! library's own encoders, the liblzf streams of userland/hast/tests/vectors,
//! the hast.conf of the tests and docs. `make fuzz-seeds` runs it and then
//! minimizes the result into fuzz/corpus/ (`cargo fuzz cmin`).
//!
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --example seeds [dir]`.

use std::path::{Path, PathBuf};

use hast::config::{Checksum, Compression};
use hast::control;
use hast::engine::probe;
use hast::handshake::{Attach, Geometry, Hello, Welcome, SYNC_MARK_FIELD, SYNC_MARK_START};
use hast::metadata::Metadata;
use hast::nbd::proto as nbd;
use hast::nv::{Nv, Value};
use hast::payload;
use hast::proto;
use hast::role::Role;
use hast::splitbrain::{Counters, SyncSrc};
use hast::wire::{Cmd, Reply, Request};
use hast_fuzz::PayloadInput;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ has a parent")
        .to_path_buf()
}

struct Out {
    dir: PathBuf,
    count: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let d = self.dir.join(target);
        std::fs::create_dir_all(&d).expect("create the seed directory");
        std::fs::write(d.join(name), bytes).expect("write a seed");
        self.count += 1;
    }
}

/// A frame as `hast_proto_send` writes it, with the given version byte.
fn frame_v(version: u8, nv: &Nv, payload: &[u8]) -> Vec<u8> {
    let mut f = proto::encode_frame(nv, payload).expect("seed frame encodes");
    f[0] = version;
    f
}

fn frame(nv: &Nv, payload: &[u8]) -> Vec<u8> {
    frame_v(proto::HAST_PROTO_VERSION, nv, payload)
}

/// ASCII lines, as `text()` of userland/hast/tests/payload.rs.
fn text(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n {
        out.extend_from_slice(
            format!(
                "block {i:05} of the HAST payload test, offset {}\n",
                out.len()
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

/// xorshift32 low bytes, as in userland/hast/tests/payload.rs.
fn xorshift(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// `mixed()` of userland/hast/tests/payload.rs.
fn mixed() -> Vec<u8> {
    let mut v = xorshift(4096, 0x2545_F491);
    for _ in 0..512 {
        v.extend_from_slice(b"0123456789abcdef");
    }
    v
}

fn vector(name: &str) -> Vec<u8> {
    let p = root().join("userland/hast/tests/vectors").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn every_type() -> Nv {
    let mut nv = Nv::new();
    nv.add("i8", Value::Int8(-1))
        .add("u8", Value::Uint8(1))
        .add("i16", Value::Int16(-2))
        .add("u16", Value::Uint16(2))
        .add("i32", Value::Int32(-3))
        .add("u32", Value::Uint32(3))
        .add("i64", Value::Int64(-4))
        .add("u64", Value::Uint64(4))
        .add("i8a", Value::Int8Array(vec![-1, 1]))
        .add("u8a", Value::Uint8Array(vec![1, 2, 3]))
        .add("i16a", Value::Int16Array(vec![-1, 1]))
        .add("u16a", Value::Uint16Array(vec![1, 2]))
        .add("i32a", Value::Int32Array(vec![-1]))
        .add("u32a", Value::Uint32Array(vec![1, 2, 3]))
        .add("i64a", Value::Int64Array(vec![-1]))
        .add("u64a", Value::Uint64Array(vec![1, 2]))
        .add_string("s", "a string");
    nv
}

fn metadata(prevrole: Role, syncing: bool) -> Metadata {
    // hastctl create's defaults on a 1 GiB provider (README).
    Metadata {
        resource: "data".into(),
        datasize: 1_073_737_216,
        extentsize: 2_097_152,
        keepdirty: 64,
        localoff: 4608,
        resuid: 0x1234_5678_9abc_def0,
        localcnt: 3,
        remotecnt: 2,
        prevrole,
        syncing,
    }
}

fn request(cmd: Cmd, seq: u64, offset: u64, length: u64, memsync: bool) -> Nv {
    Request {
        cmd,
        seq,
        offset,
        length,
        memsync,
    }
    .to_nv()
}

/// The handshake of a FreeBSD primary and secondary, frame by frame.
fn handshake_frames() -> Vec<(&'static str, Vec<u8>)> {
    let token = [0x5a; hast::handshake::TOKEN_SIZE];
    let hello = Hello {
        resource: "data".into(),
        version: 2,
    };
    let welcome = Welcome::Accepted { version: 2, token };
    let refused = Welcome::Refused {
        errmsg: "Remote node acts as primary for the resource and not as secondary.".into(),
        wait: true,
    };
    let attach = Attach {
        resource: "data".into(),
        token,
        virgin: true,
        resuid: 0x1234_5678_9abc_def0,
        localcnt: 1,
        remotecnt: 0,
        synctrack: false,
    };
    let geometry = |maxio, synctrack| Geometry {
        datasize: 1_073_737_216,
        extentsize: 2_097_152,
        localcnt: 0,
        remotecnt: 1,
        virgin: false,
        syncsrc: SyncSrc::Primary,
        mapsize: 512,
        maxio,
        synctrack,
    };
    // The map through the data pipeline: clean (a hole), dirty and plain,
    // with checksums.
    let clean = vec![0u8; 512];
    let mut dirty = vec![0u8; 512];
    dirty[0] = 0x81;
    dirty[100] = 0xff;
    let geo_frame = |g: &Geometry, map: &[u8], c, k| {
        let mut nv = g.to_nv();
        let wire = payload::encode(&mut nv, map, c, k).into_owned();
        frame(&nv, &wire)
    };
    let mut probe_hello = hello.to_nv();
    probe_hello.add_u8("probe", 1);
    let counters = Counters {
        resuid: 7,
        localcnt: 2,
        remotecnt: 1,
    };
    vec![
        ("hello-freebsd", frame_v(1, &hello.to_nv(), &[])),
        ("welcome", frame(&welcome.to_nv(), &[])),
        ("refused", frame(&refused.to_nv(), &[])),
        ("attach", frame(&attach.to_nv(), &[])),
        (
            "geometry-hole-crc32",
            geo_frame(
                &geometry(None, false),
                &clean,
                Compression::Hole,
                Checksum::Crc32,
            ),
        ),
        (
            "geometry-dirty-sha256",
            geo_frame(
                &geometry(Some(1 << 20), true),
                &dirty,
                Compression::Hole,
                Checksum::Sha256,
            ),
        ),
        ("probe", frame(&probe_hello, &[])),
        (
            "probe-answer",
            frame(&probe::answer(Role::Secondary, counters), &[]),
        ),
    ]
}

fn seeds_nv(o: &mut Out) {
    let mut cmd = Nv::new();
    cmd.add_u8("cmd", 1);
    o.put("nv", "reference-cmd", &cmd.encode().expect("encodes"));
    o.put("nv", "every-type", &every_type().encode().expect("encodes"));
    let md = metadata(Role::Primary, true).to_nv().expect("metadata nv");
    o.put("nv", "metadata", &md.encode().expect("encodes"));
    o.put(
        "nv",
        "write-request",
        &request(Cmd::Write, 9, 4096, 4096, true)
            .encode()
            .expect("encodes"),
    );
}

fn seeds_frame(o: &mut Out) {
    let data = text(4096);
    let zeros = vec![0u8; 8192];
    let mut stream = Vec::new();
    // A write with each pipeline, a read, a delete, a flush, keepalives
    // (one with a synchronization mark), replies with and without data.
    for (i, (block, c, k)) in [
        (&data, Compression::None, Checksum::None),
        (&data, Compression::Lzf, Checksum::Crc32),
        (&zeros, Compression::Hole, Checksum::Sha256),
    ]
    .into_iter()
    .enumerate()
    {
        let mut nv = request(Cmd::Write, i as u64 + 1, 0, block.len() as u64, i == 1);
        let wire = payload::encode(&mut nv, block, c, k).into_owned();
        stream.extend(frame(&nv, &wire));
    }
    stream.extend(frame(&request(Cmd::Read, 4, 512, 4096, false), &[]));
    stream.extend(frame(&request(Cmd::Delete, 5, 0, 1 << 21, false), &[]));
    stream.extend(frame(&request(Cmd::Flush, 6, 0, 0, false), &[]));
    let mut ka = request(Cmd::Keepalive, 0, 0, 0, false);
    stream.extend(frame(&ka, &[]));
    ka.add_string(SYNC_MARK_FIELD, SYNC_MARK_START);
    stream.extend(frame(&ka, &[]));
    o.put("frame", "requests", &stream);
    let mut replies = Vec::new();
    let r = |seq, received, error| Reply {
        seq,
        received,
        error,
    };
    replies.extend(frame(&r(1, true, 0).to_nv(), &[]));
    replies.extend(frame(&r(1, false, 0).to_nv(), &[]));
    replies.extend(frame(&r(2, false, 5).to_nv(), &[]));
    let mut nv = r(4, false, 0).to_nv();
    let wire = payload::encode(&mut nv, &data, Compression::Lzf, Checksum::Crc32).into_owned();
    replies.extend(frame(&nv, &wire));
    o.put("frame", "replies", &replies);
    // A FreeBSD primary's first frame carries version byte 1.
    let hello = Hello {
        resource: "data".into(),
        version: 2,
    };
    o.put("frame", "hello-freebsd", &frame_v(1, &hello.to_nv(), &[]));
}

fn seeds_handshake(o: &mut Out) {
    let frames = handshake_frames();
    let mut all = Vec::new();
    for (name, f) in &frames {
        o.put("handshake", name, f);
        all.extend_from_slice(f);
    }
    o.put("handshake", "whole-handshake", &all);
}

fn seeds_config(o: &mut Out) {
    for (name, path) in [
        ("tests-hast.conf", "userland/hast/tests/conf/hast.conf"),
        ("hast.conf.sample", "docs/hast.conf.sample"),
    ] {
        let p = root().join(path);
        let text = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        o.put("config", name, &text);
    }
    o.put(
        "config",
        "minimal",
        b"resource data {\n\ton hasta {\n\t\tlocal /dev/da0\n\t\tremote 10.0.0.2\n\t}\n\ton hastb {\n\t\tlocal /dev/da0\n\t\tremote 10.0.0.1\n\t}\n}\n",
    );
    o.put(
        "config",
        "node-blocks",
        b"on hasta {\n\tcontrol uds:///tmp/a.sock\n\tpidfile /tmp/a.pid\n\tlisten tcp://127.0.0.1:8457\n}\ntimeout 5\nchecksum sha256\ncompression lzf\nreplication async\nresource r {\n\tlocal /tmp/r.img\n\ton hasta { remote tcp6://[::1]:9000 source 127.0.0.2 nbd tcp://127.0.0.1:10809 }\n\ton hostid7 { remote none }\n}\n",
    );
}

/// An NBD option: header and data.
fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = nbd::IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn nbd_request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    nbd::NbdRequest {
        magic: nbd::REQUEST_MAGIC,
        flags,
        kind,
        cookie,
        offset,
        length,
    }
    .encode()
    .to_vec()
}

fn transmission() -> Vec<u8> {
    let mut v = nbd_request(nbd::CMD_WRITE, nbd::CMD_FLAG_FUA, 1, 0, 512);
    v.extend_from_slice(&[0xab; 512]);
    v.extend(nbd_request(nbd::CMD_READ, 0, 2, 0, 1024));
    v.extend(nbd_request(nbd::CMD_FLUSH, 0, 3, 0, 0));
    v.extend(nbd_request(nbd::CMD_TRIM, 0, 4, 4096, 4096));
    v.extend(nbd_request(
        nbd::CMD_WRITE_ZEROES,
        nbd::CMD_FLAG_NO_HOLE,
        5,
        8192,
        512,
    ));
    v.extend(nbd_request(nbd::CMD_READ, 0, 6, (1 << 20) - 512, 1024));
    v.extend(nbd_request(nbd::CMD_DISC, 0, 7, 0, 0));
    v
}

fn seeds_nbd(o: &mut Out) {
    let flags = (nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES).to_be_bytes();
    let mut go = flags.to_vec();
    go.extend(option(
        nbd::OPT_GO,
        &info_data("data", &[nbd::INFO_NAME, nbd::INFO_BLOCK_SIZE]),
    ));
    go.extend(transmission());
    o.put("nbd", "go-and-requests", &go);
    let mut list = flags.to_vec();
    list.extend(option(nbd::OPT_LIST, &[]));
    list.extend(option(nbd::OPT_STRUCTURED_REPLY, &[]));
    list.extend(option(nbd::OPT_INFO, &info_data("nosuch", &[])));
    list.extend(option(nbd::OPT_INFO, &info_data("data", &[nbd::INFO_NAME])));
    list.extend(option(nbd::OPT_ABORT, &[]));
    o.put("nbd", "list-info-abort", &list);
    let mut old = nbd::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    old.extend(option(nbd::OPT_EXPORT_NAME, b"data"));
    old.extend(transmission());
    o.put("nbd", "export-name", &old);
}

fn seeds_payload(o: &mut Out) {
    let mut base = Nv::new();
    base.add_u8("cmd", 2).add_u64("seq", 1);
    let blocks: Vec<(&str, Vec<u8>)> = vec![
        ("text", text(8192)),
        ("zeros", vec![0u8; 4096]),
        ("noise", xorshift(2048, 7)),
        ("mixed", mixed()),
    ];
    for (name, block) in &blocks {
        for c in [Compression::None, Compression::Hole, Compression::Lzf] {
            for k in [Checksum::None, Checksum::Crc32, Checksum::Sha256] {
                let mut nv = base.clone();
                let wire = payload::encode(&mut nv, block, c, k);
                let input = PayloadInput::build(block.len() as u32, &nv, &wire);
                o.put(
                    "payload",
                    &format!("{name}-{}-{}", c.as_str(), k.as_str()),
                    &input,
                );
            }
        }
    }
    // The streams liblzf made, as lzf payloads.
    for (name, data) in [
        ("liblzf-text.lzf", text(8192)),
        ("liblzf-mixed.lzf", mixed()),
    ] {
        let mut wire = (data.len() as u32).to_le_bytes().to_vec();
        wire.extend(vector(name));
        let mut nv = base.clone();
        nv.add_string("compression", "lzf");
        o.put(
            "payload",
            name,
            &PayloadInput::build(data.len() as u32, &nv, &wire),
        );
    }
}

fn seeds_control(o: &mut Out) {
    let names = vec!["data".to_string(), "tank".to_string()];
    o.put(
        "control",
        "setrole-primary",
        &frame(&control::setrole_request(Role::Primary, &names, false), &[]),
    );
    o.put(
        "control",
        "setrole-force-all",
        &frame(
            &control::setrole_request(Role::Primary, &["all".to_string()], true),
            &[],
        ),
    );
    o.put(
        "control",
        "status-all",
        &frame(&control::status_request(&[]), &[]),
    );
    o.put(
        "control",
        "status-named",
        &frame(&control::status_request(&names), &[]),
    );
    let mut bad = Nv::new();
    bad.add_u8("cmd", 9).add_string("resource0", "data");
    o.put("control", "bad-cmd", &frame(&bad, &[]));
}

fn seeds_metadata(o: &mut Out) {
    for (name, md) in [
        ("init", metadata(Role::Init, false)),
        ("primary-syncing", metadata(Role::Primary, true)),
        ("secondary", metadata(Role::Secondary, false)),
    ] {
        let block = md.encode().expect("seed metadata encodes");
        // Trailing zeros are implied by the target.
        let end = block.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        o.put("metadata", name, &block[..end]);
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("fuzz/seeds"));
    let mut o = Out {
        dir: dir.clone(),
        count: 0,
    };
    seeds_nv(&mut o);
    seeds_frame(&mut o);
    seeds_handshake(&mut o);
    seeds_config(&mut o);
    seeds_nbd(&mut o);
    seeds_payload(&mut o);
    seeds_control(&mut o);
    seeds_metadata(&mut o);
    println!("{} seeds written to {}", o.count, dir.display());
}
