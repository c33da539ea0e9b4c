//! Property tests (proptest) of everything in pipeline-core that parses bytes from outside:
//! IDX files (plain and gzip), request payloads with their content type, and the `label` and
//! `sent-at` header values. Each property runs on thousands of generated inputs, arbitrary and
//! shaped like the real thing, and checks that parsing never panics and that what it accepts
//! is consistent. proptest shrinks a failure to its smallest input and keeps it in
//! `proptest-regressions/`, so it is tried again first on every later run.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use pipeline_core::IMAGE_BYTES;
use pipeline_core::idx::IdxArray;
use pipeline_core::wire::{decode_image, parse_label, parse_sent_at};
use proptest::prelude::*;

/// An IDX header of unsigned bytes with any dimensions (zero, huge, overflowing when
/// multiplied), followed by up to 2 KiB of data.
fn idx_like() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..=6,
        prop::collection::vec(prop_oneof![0u32..=64, any::<u32>()], 6),
        prop::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(ndim, dims, data)| {
            let mut bytes = vec![0, 0, 0x08, ndim];
            for dim in dims.iter().take(usize::from(ndim)) {
                bytes.extend_from_slice(&dim.to_be_bytes());
            }
            bytes.extend(data);
            bytes
        })
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// What every accepted IDX array must satisfy, and every reading of it as images or labels.
fn check_idx(bytes: &[u8]) {
    if let Ok(array) = IdxArray::parse(bytes) {
        let elements = array
            .dims
            .iter()
            .try_fold(1usize, |product, &dim| product.checked_mul(dim));
        assert_eq!(elements, Some(array.data.len()), "{:?}", array.dims);
    }
    if let Ok(images) = IdxArray::images(bytes) {
        let count = images.len();
        for index in [0, 1, count.saturating_sub(1), count, count + 1, usize::MAX] {
            if let Some(pixels) = images.get(index) {
                assert!(index < count);
                assert_eq!(pixels.len(), images.rows * images.columns);
            } else {
                assert!(index >= count || images.rows * images.columns == 0);
            }
        }
        assert!(images.iter().count() <= count.max(1));
    }
    let _ = IdxArray::labels(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn arbitrary_bytes_never_crash_the_idx_reader(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_idx(&bytes);
    }

    #[test]
    fn idx_headers_with_any_dimensions_never_crash_the_idx_reader(bytes in idx_like()) {
        check_idx(&bytes);
    }

    #[test]
    fn gzip_of_anything_never_crashes_the_idx_reader(bytes in idx_like()) {
        check_idx(&gzip(&bytes));
        // Damaged gzip: the stream cut short, or a byte changed.
        let packed = gzip(&bytes);
        check_idx(&packed[..packed.len() / 2]);
        let mut flipped = packed.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x5a;
        check_idx(&flipped);
    }

    #[test]
    fn a_request_is_an_image_exactly_when_it_has_the_size_and_content_type(
        content_type in prop::option::of(prop_oneof![
            Just("image/x-gray8; width=28; height=28".to_string()),
            Just("IMAGE/X-GRAY8".to_string()),
            "image/x-gray8(; ?(width|height)=[0-9]{1,3}){0,3}",
            "[ -~]{0,40}",
            any::<String>(),
        ]),
        size in prop_oneof![Just(IMAGE_BYTES), 0usize..2000],
    ) {
        let payload = vec![7u8; size];
        match decode_image(content_type.as_deref(), &payload) {
            Ok(pixels) => {
                prop_assert_eq!(size, IMAGE_BYTES);
                prop_assert_eq!(pixels.len(), IMAGE_BYTES);
            }
            Err(_) => prop_assert!(
                size != IMAGE_BYTES || content_type.is_some(),
                "a raw image without a content type is accepted"
            ),
        }
    }

    #[test]
    fn header_values_never_crash_their_parsers(value in any::<String>()) {
        if let Some(label) = parse_label(&value) {
            prop_assert!(label < 10);
        }
        if let Some(sent_at) = parse_sent_at(&value) {
            prop_assert!(sent_at.is_finite() && sent_at >= 0.0);
        }
    }
}
