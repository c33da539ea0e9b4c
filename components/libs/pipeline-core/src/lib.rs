//! What the three Fashion-MNIST components agree on: the request and prediction formats, the
//! header names, the class names, the IDX file format the dataset ships in, the tally the
//! consumer keeps and the row it writes.
//!
//! It is plain Rust with no WIT bindings so it is tested natively and inside Wasm, and so the
//! host's end-to-end tests can decode what the components produce without copying the format.
#![deny(missing_docs)]

pub mod idx;
pub mod row;
pub mod tally;
pub mod wire;

/// The ten Fashion-MNIST classes, indexed by label.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Side of the square gray images the model takes.
pub const IMAGE_SIDE: usize = 28;

/// Bytes of one raw image: 28 × 28 gray8, row-major.
pub const IMAGE_BYTES: usize = IMAGE_SIDE * IMAGE_SIDE;
