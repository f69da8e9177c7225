//! fio as the tests run it: random 4 KiB writes with crc32c verification, each job on a
//! region of its own, and fio's JSON report read back.

use super::{ok, FIO};
use std::path::Path;

/// fio's JSON report out of its output (the nbd engine prints a line per connection
/// before it).
pub fn fio_json(out: &str) -> serde_json::Value {
    let at = out
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| out.find('{'))
        .unwrap_or(0);
    serde_json::from_str(&out[at..]).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{out}"))
}

/// The engine options of fio's nbd engine on `uri`.
pub fn nbd_engine(uri: &str) -> Vec<String> {
    vec!["--ioengine=nbd".into(), format!("--uri={uri}")]
}

/// The engine options of libaio with O_DIRECT on the file `path`.
pub fn file_engine(path: &Path) -> Vec<String> {
    vec![
        format!("--filename={}", path.display()),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
    ]
}

/// A verified run: `jobs` jobs named `name`, each writing random 4 KiB blocks over a
/// region of `region` bytes of its own (overlapping jobs would fail verification) at
/// `iodepth` requests in flight.
pub struct Verified<'a> {
    pub name: &'a str,
    pub engine: Vec<String>,
    pub jobs: u64,
    pub region: u64,
    pub iodepth: u32,
}

impl Verified<'_> {
    /// Runs fio in `dir` and asserts that every job wrote its whole region and read it
    /// back verified; with `verify_only`, fio only reads back what an earlier run wrote
    /// (counting the writes it replays without sending them).
    pub fn run(&self, dir: &Path, verify_only: bool) {
        let mut args = vec![format!("--name={}", self.name)];
        args.extend(self.engine.iter().cloned());
        args.extend([
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--size={}", self.region),
            format!("--offset_increment={}", self.region),
            format!("--iodepth={}", self.iodepth),
            format!("--numjobs={}", self.jobs),
            "--verify=crc32c".into(),
            "--verify_fatal=1".into(),
            "--output-format=json".into(),
        ]);
        if verify_only {
            args.push("--verify_only=1".into());
        }
        let report = fio_json(&ok(dir, FIO, &args));
        let jobs = report["jobs"].as_array().expect("fio jobs");
        assert_eq!(jobs.len() as u64, self.jobs);
        for j in jobs {
            assert_eq!(j["error"], 0, "fio job error: {j}");
            assert_eq!(j["read"]["io_bytes"], self.region, "verified bytes: {j}");
            if !verify_only {
                assert_eq!(j["write"]["io_bytes"], self.region, "written bytes: {j}");
            }
        }
    }
}
