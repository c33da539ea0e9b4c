//! Reader for the IDX format Fashion-MNIST ships in (gzip-compressed or plain).
//!
//! Layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one
//! big-endian u32 per dimension, then the data row-major.

use std::io::Read;

use flate2::read::GzDecoder;

/// Why an IDX file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file could not be read or decompressed.
    #[error("cannot read the IDX data: {0}")]
    Io(#[from] std::io::Error),
    /// The header is not an unsigned-byte IDX header.
    #[error(
        "not an IDX file of unsigned bytes (first bytes {0:02x?}); expected a Fashion-MNIST \
         file such as t10k-images-idx3-ubyte.gz"
    )]
    BadMagic(Vec<u8>),
    /// The header promises more data than the file holds.
    #[error("the IDX header promises {expected} bytes of data but the file holds {actual}")]
    Truncated {
        /// Bytes the dimensions call for.
        expected: usize,
        /// Bytes present after the header.
        actual: usize,
    },
    /// The images have no pixels, or more than memory can address.
    #[error("the IDX file holds images of {rows} × {columns} pixels, which cannot be read")]
    ImageSize {
        /// Rows per image.
        rows: usize,
        /// Columns per image.
        columns: usize,
    },
    /// The file has the wrong number of dimensions for what was asked.
    #[error("expected an IDX file with {expected} dimensions, found {actual}")]
    Dimensions {
        /// Dimensions wanted.
        expected: usize,
        /// Dimensions in the file.
        actual: usize,
    },
}

/// An unsigned-byte IDX array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Size of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<u8>,
}

impl IdxArray {
    /// Parses IDX bytes; gzip input (magic `1f 8b`) is decompressed first.
    pub fn parse(bytes: &[u8]) -> Result<Self, IdxError> {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut plain = Vec::new();
            GzDecoder::new(bytes).read_to_end(&mut plain)?;
            return Self::parse_plain(&plain);
        }
        Self::parse_plain(bytes)
    }

    fn parse_plain(bytes: &[u8]) -> Result<Self, IdxError> {
        let magic_error = || IdxError::BadMagic(bytes.iter().take(4).copied().collect());
        if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
            return Err(magic_error());
        }
        let ndim = usize::from(bytes[3]);
        let header = 4 + 4 * ndim;
        if ndim == 0 || bytes.len() < header {
            return Err(magic_error());
        }
        let dims: Vec<usize> = bytes[4..header]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let actual = bytes.len() - header;
        // Checked: dimensions come from the file, and their product can pass usize.
        let expected = dims
            .iter()
            .try_fold(1usize, |product, &dim| product.checked_mul(dim))
            .unwrap_or(usize::MAX);
        if actual < expected {
            return Err(IdxError::Truncated { expected, actual });
        }
        Ok(Self {
            dims,
            data: bytes[header..header + expected].to_vec(),
        })
    }

    /// Reads a file of images (three dimensions: count × rows × columns).
    pub fn images(bytes: &[u8]) -> Result<Images, IdxError> {
        let array = Self::parse(bytes)?;
        if array.dims.len() != 3 {
            return Err(IdxError::Dimensions {
                expected: 3,
                actual: array.dims.len(),
            });
        }
        let (rows, columns) = (array.dims[1], array.dims[2]);
        if rows.checked_mul(columns).is_none_or(|size| size == 0) {
            return Err(IdxError::ImageSize { rows, columns });
        }
        Ok(Images {
            rows,
            columns,
            data: array.data,
        })
    }

    /// Reads a file of labels (one dimension).
    pub fn labels(bytes: &[u8]) -> Result<Vec<u8>, IdxError> {
        let array = Self::parse(bytes)?;
        if array.dims.len() != 1 {
            return Err(IdxError::Dimensions {
                expected: 1,
                actual: array.dims.len(),
            });
        }
        Ok(array.data)
    }
}

/// A stack of equally sized gray8 images. `rows × columns` is at least 1 and fits `usize`
/// ([`IdxArray::images`] checks it), so the arithmetic below cannot overflow or divide by 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub columns: usize,
    data: Vec<u8>,
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.data.len() / (self.rows * self.columns)
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pixels of image `index`, row-major.
    pub fn get(&self, index: usize) -> Option<&[u8]> {
        let size = self.rows * self.columns;
        let start = index.checked_mul(size)?;
        self.data.get(start..start.checked_add(size)?)
    }

    /// Iterates over the images in file order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.data.chunks_exact(self.rows * self.columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn idx3(count: u32, rows: u32, cols: u32) -> Vec<u8> {
        let mut bytes = vec![0, 0, 8, 3];
        for d in [count, rows, cols] {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend((0..count * rows * cols).map(|i| i as u8));
        bytes
    }

    #[test]
    fn reads_plain_and_gzip_images() {
        let plain = idx3(3, 2, 2);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        for bytes in [plain, gz] {
            let images = IdxArray::images(&bytes).unwrap();
            assert_eq!(images.len(), 3);
            assert_eq!(images.get(1), Some(&[4u8, 5, 6, 7][..]));
            assert_eq!(images.get(3), None);
            assert_eq!(images.iter().count(), 3);
        }
    }

    #[test]
    fn reads_labels() {
        let bytes = [0, 0, 8, 1, 0, 0, 0, 3, 9, 2, 1];
        assert_eq!(IdxArray::labels(&bytes).unwrap(), vec![9, 2, 1]);
    }

    #[test]
    fn rejects_what_is_not_idx() {
        let err = IdxArray::parse(b"\x89PNG\r\n").unwrap_err();
        assert!(matches!(err, IdxError::BadMagic(_)), "{err}");
        assert!(err.to_string().contains("t10k-images-idx3-ubyte.gz"));
    }

    #[test]
    fn rejects_truncated_data_and_wrong_rank() {
        let mut bytes = idx3(2, 2, 2);
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            IdxArray::parse(&bytes),
            Err(IdxError::Truncated {
                expected: 8,
                actual: 7
            })
        ));
        assert!(matches!(
            IdxArray::labels(&idx3(1, 1, 1)),
            Err(IdxError::Dimensions {
                expected: 1,
                actual: 3
            })
        ));
    }

    #[test]
    fn rejects_broken_gzip() {
        let err = IdxArray::parse(&[0x1f, 0x8b, 0, 1, 2]).unwrap_err();
        assert!(matches!(err, IdxError::Io(_)), "{err}");
    }
}
