//! The TIFF reader (images, stacks, masks) on arbitrary bytes: any outcome but a crash,
//! a hang or an unbounded allocation is fine; errors must be `Error::Tiff` or `Error::Io`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("tif", data);
    for r in [
        lumos::io::tiff::read_stack(&p).map(|_| ()),
        lumos::io::tiff::read_image(&p).map(|_| ()),
        lumos::io::tiff::read_mask(&p).map(|_| ()),
    ] {
        if let Err(e) = r {
            assert!(matches!(e, lumos::Error::Tiff { .. } | lumos::Error::Io { .. } | lumos::Error::InvalidInput(_)), "{e:?}");
        }
    }
});
