//! Safetensors checkpoints (one file or sharded with an index), memory-mapped, read by name.
//!
//! The header of every file is validated when it is opened (offsets inside the file, byte
//! counts matching shape × dtype), so a truncated or corrupt file fails at load with its name
//! rather than as garbage numbers later.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::tensor::{DType, Weight, WeightData, weight_buffer};

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A raw view of one tensor of the checkpoint.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

pub struct WeightStore {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
}

impl WeightStore {
    /// Opens `model.safetensors.index.json` if present, else `model.safetensors`, else every
    /// `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let value: Value =
                serde_json::from_str(&text).map_err(|e| EngineError::MalformedJson {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = value
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| EngineError::MalformedJson {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| EngineError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if paths.is_empty() {
            return Err(EngineError::Safetensors {
                path: dir.to_path_buf(),
                message: "no safetensors files in the model directory".into(),
            });
        }
        let mut store = WeightStore {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in paths {
            store.add_file(path)?;
        }
        Ok(store)
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut store = WeightStore {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        store.add_file(path.to_path_buf())?;
        Ok(store)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
        // SAFETY: checkpoints are read-only inputs; the engine never writes to a mapped file,
        // and a file changed under a running server is outside what any loader can guard.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
        let bad = |message: String| EngineError::Safetensors {
            path: path.clone(),
            message,
        };
        let (_, entries) = parse_header(&mmap, self.files.len()).map_err(bad)?;
        self.tensors.extend(entries);
        self.files.push((path, mmap));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, entry) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        let dtype =
            DType::from_safetensors(&entry.dtype).ok_or_else(|| EngineError::TensorDType {
                name: name.to_string(),
                actual: entry.dtype.clone(),
                expected: "F32, BF16 or F16",
            })?;
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        Ok(TensorRef {
            name: key,
            dtype,
            shape: &entry.shape,
            bytes,
        })
    }

    /// Any tensor as stored: dtype name, shape and bytes (for dtypes the model never uses,
    /// such as the integer tensors of test fixtures).
    pub fn raw(&self, name: &str) -> Result<(&str, &[usize], &[u8])> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        Ok((
            &entry.dtype,
            &entry.shape,
            &self.files[entry.file].1[entry.start..entry.end],
        ))
    }

    /// A `[rows, cols]` matrix in its checkpoint dtype.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let t = self.get(name)?;
        check_shape(&t, &[rows, cols])?;
        Ok(weight_from_bytes(t.dtype, t.bytes, rows, cols))
    }

    /// Slice `index` of a `[n, rows, cols]` tensor (fused expert weights) as a matrix.
    pub fn matrix_of_stack(
        &self,
        name: &str,
        n: usize,
        index: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Weight> {
        let t = self.get(name)?;
        check_shape(&t, &[n, rows, cols])?;
        let each = rows * cols * t.dtype.size();
        let bytes = &t.bytes[index * each..(index + 1) * each];
        Ok(weight_from_bytes(t.dtype, bytes, rows, cols))
    }

    /// A small tensor widened to f32, with the exact `shape` expected.
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        check_shape(&t, shape)?;
        Ok(widen(t.dtype, t.bytes))
    }
}

/// Checks a whole safetensors file given as bytes, as opening it does; returns how many
/// tensors it holds, or the problem. Never panics, whatever the bytes (fuzzed:
/// `fuzz/fuzz_targets/safetensors_header.rs`).
pub fn check_safetensors(bytes: &[u8]) -> std::result::Result<usize, String> {
    parse_header(bytes, 0).map(|(_, entries)| entries.len())
}

/// Its 8-byte header length, the JSON header, every tensor's dtype, shape and byte range
/// inside the file: where the data starts and each tensor's entry (for the file numbered
/// `file`), or a message for the caller to put after the file's name.
fn parse_header(
    bytes: &[u8],
    file: usize,
) -> std::result::Result<(usize, Vec<(String, TensorEntry)>), String> {
    if bytes.len() < 8 {
        return Err(format!("truncated: {} bytes, no header", bytes.len()));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .filter(|&s| s <= bytes.len())
        .ok_or_else(|| {
            format!(
                "truncated: header of {header_len} bytes but the file has {}",
                bytes.len()
            )
        })?;
    let header: HashMap<String, Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| format!("malformed header: {e}"))?;
    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry =
            parse_entry(&info, file, data_start).map_err(|m| format!("tensor `{name}`: {m}"))?;
        if entry.end > bytes.len() {
            return Err(format!(
                "truncated: tensor `{name}` ends at byte {} but the file has {}",
                entry.end,
                bytes.len()
            ));
        }
        entries.push((name, entry));
    }
    Ok((data_start, entries))
}

fn parse_entry(
    info: &Value,
    file: usize,
    data_start: usize,
) -> std::result::Result<TensorEntry, String> {
    let dtype = info
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("no dtype")?
        .to_string();
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("no shape")?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or("shape is not a list of sizes")
        })
        .collect::<std::result::Result<_, _>>()?;
    let offsets = info
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("no data_offsets")?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (
            b.as_u64().ok_or("bad offset")? as usize,
            e.as_u64().ok_or("bad offset")? as usize,
        ),
        _ => return Err("data_offsets must be [begin, end]".into()),
    };
    if end < begin {
        return Err(format!("data_offsets [{begin}, {end}] run backwards"));
    }
    if let Some(dt) = DType::from_safetensors(&dtype) {
        let want = shape
            .iter()
            .try_fold(dt.size(), |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} of {dtype} overflows the address space"))?;
        if end - begin != want {
            return Err(format!(
                "{} bytes for shape {shape:?} of {dtype} ({want} expected)",
                end - begin
            ));
        }
    }
    let (Some(start), Some(end)) = (data_start.checked_add(begin), data_start.checked_add(end))
    else {
        return Err(format!(
            "data_offsets [{begin}, {end}] run past the address space"
        ));
    };
    Ok(TensorEntry {
        file,
        dtype,
        shape,
        start,
        end,
    })
}

fn check_shape(t: &TensorRef<'_>, expected: &[usize]) -> Result<()> {
    if t.shape != expected {
        return Err(EngineError::TensorShape {
            name: t.name.to_string(),
            actual: t.shape.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// Copies little-endian values out of the checkpoint into fresh anonymous memory, asking the
/// kernel for transparent huge pages first: weights are streamed every step, and 2 MiB pages
/// cut both the page faults at load and the TLB misses in the kernels.
fn copy_le<T: Copy + Default>(bytes: &[u8], from_le: impl Fn(&[u8]) -> T) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    let mut out: Vec<T> = weight_buffer(n);
    if cfg!(target_endian = "little") {
        // SAFETY: `out` has capacity for n values, every bit pattern is a valid T (u16 or
        // f32), and on a little-endian target the file's byte order is the in-memory one.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), n * size);
            out.set_len(n);
        }
    } else {
        out.extend(bytes.chunks_exact(size).map(from_le));
    }
    out
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    copy_le(bytes, |c| u16::from_le_bytes([c[0], c[1]]))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    copy_le(bytes, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn weight_from_bytes(dtype: DType, bytes: &[u8], rows: usize, cols: usize) -> Weight {
    let data = match dtype {
        DType::F32 => WeightData::F32(f32s(bytes)),
        DType::BF16 => WeightData::BF16(u16s(bytes)),
        DType::F16 => WeightData::F16(u16s(bytes)),
        // Not a checkpoint dtype (`from_safetensors` never yields it): raw values, unit scales.
        DType::I8 => WeightData::I8 {
            q: bytes.iter().map(|&b| b as i8).collect(),
            scales: vec![1.0; rows],
        },
    };
    Weight { rows, cols, data }
}

fn widen(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let w = weight_from_bytes(dtype, bytes, 1, bytes.len() / dtype.size());
    let mut out = vec![0.0; w.cols];
    w.row_f32(0, &mut out);
    out
}

/// Writes a safetensors file from tensors held in memory (tests, small files).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, DType, Vec<u8>)],
) -> Result<()> {
    let header: Vec<(String, Vec<usize>, DType)> = tensors
        .iter()
        .map(|(n, s, d, _)| (n.clone(), s.clone(), *d))
        .collect();
    write_safetensors_streamed(path, &header, |i| tensors[i].3.clone())
}

/// Writes a safetensors file whose tensors are produced one at a time by `data(i)`, so a
/// multi-GB checkpoint never sits in memory whole.
pub fn write_safetensors_streamed(
    path: &Path,
    tensors: &[(String, Vec<usize>, DType)],
    mut data: impl FnMut(usize) -> Vec<u8>,
) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, dtype) in tensors {
        let len = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.safetensors_name(),
                "shape": shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header_bytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| EngineError::Safetensors {
            path: path.into(),
            message: e.to_string(),
        })?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let file = File::create(path).map_err(|e| EngineError::io(path, e))?;
    let mut out = std::io::BufWriter::new(file);
    let io = |e| EngineError::io(path, e);
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header_bytes).map_err(io)?;
    for (i, (name, shape, dtype)) in tensors.iter().enumerate() {
        let bytes = data(i);
        if bytes.len() != shape.iter().product::<usize>() * dtype.size() {
            return Err(EngineError::Safetensors {
                path: path.into(),
                message: format!(
                    "tensor `{name}`: {} bytes do not fit shape {shape:?}",
                    bytes.len()
                ),
            });
        }
        out.write_all(&bytes).map_err(io)?;
    }
    out.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let bf: Vec<u8> = [1.0f32, -2.0]
            .iter()
            .flat_map(|x| crate::tensor::f32_to_bf16(*x).to_le_bytes())
            .collect();
        write_safetensors(
            &path,
            &[
                (
                    "a".into(),
                    vec![2, 3],
                    DType::F32,
                    f32_bytes(&[1., 2., 3., 4., 5., 6.]),
                ),
                ("b".into(), vec![2], DType::BF16, bf),
            ],
        )
        .unwrap();
        let store = WeightStore::open(dir.path()).unwrap();
        let a = store.matrix("a", 2, 3).unwrap();
        assert_eq!(a.data, WeightData::F32(vec![1., 2., 3., 4., 5., 6.]));
        assert_eq!(store.f32_tensor("b", &[2]).unwrap(), vec![1.0, -2.0]);
        assert_eq!(store.get("b").unwrap().dtype, DType::BF16);
        let err = store.matrix("a", 3, 2).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("[2, 3]"), "{err}");
        let err = store.matrix("nope", 1, 1).unwrap_err().to_string();
        assert!(err.contains("missing tensor `nope`"), "{err}");
    }

    #[test]
    fn truncated_file_is_reported_with_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_safetensors(
            &path,
            &[("w".into(), vec![4, 4], DType::F32, f32_bytes(&[0.5; 16]))],
        )
        .unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 10]).unwrap();
        let err = WeightStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("truncated") && err.contains("`w`"), "{err}");
        std::fs::write(&path, &full[..5]).unwrap();
        let err = WeightStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
