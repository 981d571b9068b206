//! f32 rows ↔ little-endian bytes, as they travel in `bytes` proto fields.

use crate::error::{Result, RuntimeError};

pub fn f32s_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn bytes_to_f32s(bytes: &[u8], field: &str) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(RuntimeError::invalid(
            field,
            format!("{} bytes is not a whole number of f32 values", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exactly_and_refuses_ragged_input() {
        let v = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.25e-7];
        let back = bytes_to_f32s(&f32s_to_bytes(&v), "x").unwrap();
        assert!(v.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(bytes_to_f32s(&[0, 1, 2], "x").is_err());
    }
}
