//! Host frames to a CUDA device through page-locked staging buffers.
//!
//! libtorch copies a tensor from pageable host memory (a caller's frame) through the CUDA
//! driver's own staging, one thread copying into it, about twice the time of the transfer from page-locked
//! memory alone (docs/engine-notes.md). Here the frame goes through a ring of page-locked slots: libtorch's CPU
//! thread pool copies a piece of the frame into a slot while the DMA engine transfers the
//! previous piece, and the host does not wait for the last transfer. The transfers are
//! queued on the legacy default stream, the stream on which libtorch (through tch) runs
//! everything, so the kernels queued after them wait for them and the host goes on to
//! queue those kernels while the transfers run. A slot is rewritten only after its last
//! transfer has finished (one event per slot).
//!
//! The ring is [`SLOTS`] x [`SLOT_BYTES`] (16 MiB) of page-locked memory per device,
//! allocated at the first staged copy and kept for the life of the process. Where anything
//! fails (no driver library, an allocation or a transfer refused) [`to_device`] returns
//! `None` (logged once per device), the device's ring, if any, is freed once its stream has
//! finished, staging stays off for that device, and the caller copies with libtorch.
//! `LUMOS_CUDA_STAGED_COPY=0` switches staging off.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use ndarray::{ArrayView3, Axis, s};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use tch::{Device, Kind, Tensor};

use crate::image::array3_to_tensor;

use crate::backend::cuda_norm::ContextGuard;

/// Bytes per page-locked slot.
pub const SLOT_BYTES: usize = 2 << 20;
/// Slots in a device's ring.
pub const SLOTS: usize = 8;
const SLOT_ELEMS: usize = SLOT_BYTES / 4;

/// One page-locked slot and the event recorded after its last transfer.
struct Slot {
    ptr: *mut f32,
    event: CudaEvent,
}

struct Ring {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    slots: Vec<Slot>,
}

/// A device's ring, freed when dropped (staging failed) with the calling thread's CUDA
/// context restored afterwards.
struct Owned(Option<Ring>);

// SAFETY: the slots' memory is owned by the ring and only touched under the RINGS lock.
unsafe impl Send for Owned {}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(ring) = self.0.take() {
            // declared first, dropped last: after the ring's events and context handles
            let _g = ContextGuard::save();
            // every transfer queued from the slots must have finished before their memory
            // goes back, a transfer whose event was not recorded included
            let _ = ring.stream.synchronize();
            for s in &ring.slots {
                let _ = s.event.synchronize();
                // SAFETY: allocated by malloc_host in Ring::allocate, freed once, nothing pending.
                let _ = unsafe { cudarc::driver::result::free_host(s.ptr as *mut std::ffi::c_void) };
            }
            drop(ring);
        }
    }
}

impl Ring {
    /// The ring of device `ordinal` (the caller has checked that the driver library loads
    /// and holds a [`ContextGuard`]); a partly built ring frees its slots when dropped.
    fn allocate(ordinal: usize) -> Result<Owned, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context of device {ordinal}: {e}"))?;
        let mut owned = Owned(Some(Ring { stream: ctx.default_stream(), ctx, slots: Vec::with_capacity(SLOTS) }));
        let ring = owned.0.as_mut().expect("just built");
        for _ in 0..SLOTS {
            let event = ring.ctx.new_event(None).map_err(|e| format!("event: {e}"))?;
            ring.ctx.bind_to_thread().map_err(|e| e.to_string())?;
            // SAFETY: a plain page-locked allocation in the device's primary context (the
            // context libtorch uses), freed when the ring is dropped.
            let ptr = unsafe { cudarc::driver::result::malloc_host(SLOT_BYTES, 0) }
                .map_err(|e| format!("page-locked allocation of {SLOT_BYTES} bytes: {e}"))?;
            ring.slots.push(Slot { ptr: ptr as *mut f32, event });
        }
        Ok(owned)
    }

    /// Copies `pieces` into consecutive elements of the device memory at `dst`.
    fn copy(&mut self, pieces: &[&[f32]], dst: u64) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let mut offset = 0u64;
        let mut i = 0usize;
        for piece in pieces {
            for chunk in piece.chunks(SLOT_ELEMS) {
                let slot = &self.slots[i % SLOTS];
                i += 1;
                slot.event.synchronize().map_err(|e| format!("waiting for a slot: {e}"))?;
                let n = chunk.len() as i64;
                // SAFETY: `chunk` is live caller memory of n floats; the slot holds
                // SLOT_ELEMS >= n floats and no transfer from it is pending (synchronized
                // above); both borrowing tensors are dropped before this iteration ends.
                unsafe {
                    let src = Tensor::from_blob(chunk.as_ptr() as *const u8, &[n], &[1], Kind::Float, Device::Cpu);
                    let mut stage = Tensor::from_blob(slot.ptr as *const u8, &[n], &[1], Kind::Float, Device::Cpu);
                    // libtorch's CPU thread pool shares the copy
                    stage.f_copy_(&src).map_err(|e| format!("staging copy: {e}"))?;
                    let staged = std::slice::from_raw_parts(slot.ptr as *const f32, chunk.len());
                    cudarc::driver::result::memcpy_htod_async(dst + offset, staged, self.stream.cu_stream())
                        .map_err(|e| format!("transfer: {e}"))?;
                }
                slot.event.record(&self.stream).map_err(|e| format!("event: {e}"))?;
                offset += 4 * chunk.len() as u64;
            }
        }
        Ok(())
    }
}

/// Per device ordinal: the ring, or `None` where staging failed (logged once).
static RINGS: Lazy<Mutex<HashMap<usize, Owned>>> = Lazy::new(|| Mutex::new(HashMap::new()));

thread_local! {
    /// Staged copies made by this thread (for tests, which run on threads of their own).
    static STAGED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn enabled() -> bool {
    crate::switches::switches().cuda_staged_copy
}

/// A new float32 tensor of shape `dims` on the CUDA `device` holding the host slices
/// `pieces` one after the other (as many elements as `dims` counts), copied through the
/// device's page-locked ring; the transfers are queued on the legacy default stream and may
/// still be running on return (work queued after them on that stream waits for them; the
/// pieces' memory is no longer read). `None`, before any device allocation, where staging is
/// switched off or does not apply (not CUDA, fewer than one slot of data), and where it
/// failed: the caller copies another way.
pub fn to_device(pieces: &[&[f32]], dims: &[i64], device: Device) -> Option<Tensor> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    if !enabled() || total * 4 < SLOT_BYTES || dims.iter().product::<i64>() != total as i64 {
        return None;
    }
    let mut rings = RINGS.lock();
    let entry = rings.entry(ordinal).or_insert_with(|| {
        // cudarc panics where a library symbol is missing: keep that inside, the driver
        // library checked before the guard reads the thread's context through it
        let built = std::panic::catch_unwind(|| {
            // SAFETY: only probes whether the shared library can be opened.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("the CUDA driver library (libcuda.so) is not on the library path".to_string());
            }
            let _g = ContextGuard::save();
            Ring::allocate(ordinal)
        })
        .unwrap_or_else(|_| Err("the CUDA driver library failed to load".into()));
        built.unwrap_or_else(|e| {
            log::warn!("staged frame copies unavailable on device {ordinal}, libtorch copies the frames: {e}");
            Owned(None)
        })
    });
    let ring = entry.0.as_mut()?;
    let dst = Tensor::empty(dims, (Kind::Float, device));
    let _g = ContextGuard::save();
    match ring.copy(pieces, dst.data_ptr() as u64) {
        Ok(()) => {
            STAGED.with(|n| n.set(n.get() + 1));
            Some(dst)
        }
        Err(e) => {
            log::warn!(
                "a staged frame copy failed on device {ordinal} (or an earlier CUDA error surfaced there), libtorch copies the frames from now on: {e}"
            );
            // dropping the ring waits for the stream before freeing its memory
            *entry = Owned(None);
            None
        }
    }
}

/// Rows `y0..y1` of a `(C, H, W)` frame as a new `(1, C, y1 - y0, W)` float tensor on
/// `device` that owns its memory, without element-by-element gathering unless the strides
/// are negative: on the CPU one strided copy; on a CUDA device, 2 MiB or more whose rows are
/// contiguous within each channel go through page-locked buffers without waiting for the
/// transfer (see [`to_device`]), anything else is copied by libtorch.
pub fn rows_to_device(frame: ArrayView3<f32>, y0: usize, y1: usize, device: Device) -> Tensor {
    let v = frame.slice(s![.., y0..y1, ..]);
    if v.strides().iter().any(|&st| st < 0) || v.is_empty() {
        return array3_to_tensor(v, device).unsqueeze(0);
    }
    let dims: Vec<i64> = std::iter::once(1).chain(v.shape().iter().map(|&d| d as i64)).collect();
    let strides: Vec<i64> = std::iter::once(v.len() as i64).chain(v.strides().iter().map(|&st| st as i64)).collect();
    // SAFETY: the pointer and strides describe the view's elements, all inside the array,
    // which outlives this function; the borrowing tensor is dropped here, after the copy
    // (to another device, or into new host memory), so nothing aliases the caller's frame.
    let borrowed = unsafe { Tensor::from_blob(v.as_ptr() as *const u8, &dims, &strides, Kind::Float, Device::Cpu) };
    match device {
        Device::Cpu => {
            let mut owned = Tensor::empty(dims.as_slice(), (Kind::Float, Device::Cpu));
            owned.copy_(&borrowed);
            owned
        }
        Device::Cuda(_) => {
            // through page-locked memory, without waiting for the transfer, where
            // the ring takes it (2 MiB or more): one piece where the rows are contiguous
            // across channels (a whole frame), else one per channel (a band of rows, a frame
            // cropped in height)
            let pieces: Option<Vec<&[f32]>> = v
                .to_slice()
                .map(|s| vec![s])
                .or_else(|| (0..v.dim().0).map(|ch| v.index_axis(Axis(0), ch).to_slice()).collect());
            let staged = pieces.and_then(|p| to_device(&p, &dims, device));
            staged.unwrap_or_else(|| borrowed.to_device(device))
        }
        // other devices (MPS, ...)
        _ => borrowed.to_device(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, s};

    /// On a CUDA device (skipped without one): staged copies equal libtorch's, for one piece
    /// and several, one slot and a little more, not a multiple of a slot, and longer than
    /// the ring (slots reused while earlier transfers may still run); the host memory may
    /// be reused as soon as the call returns. Less than a slot is left to libtorch.
    #[test]
    fn staged_copies_equal_libtorchs() {
        let Some(dev) = crate::engine::device::cuda_for_test() else {
            return;
        };
        assert!(to_device(&[&[1.0f32; 1000]], &[1000], dev).is_none(), "less than a slot is staged");
        for lens in [
            vec![SLOT_ELEMS],
            vec![SLOT_ELEMS + 7],
            vec![SLOTS * SLOT_ELEMS * 2 + 12345],
            vec![300_000, 5, SLOT_ELEMS * 3],
        ] {
            let mut pieces: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(p, &n)| (0..n).map(|i| (i as f32) * 0.5 + p as f32 * 1e6).collect())
                .collect();
            let total = lens.iter().sum::<usize>() as i64;
            let refs: Vec<&[f32]> = pieces.iter().map(|p| p.as_slice()).collect();
            let dst = to_device(&refs, &[1, total], dev).unwrap_or_else(|| panic!("{lens:?}: staging refused"));
            assert_eq!(dst.size(), [1, total]);
            let want =
                Tensor::cat(&pieces.iter().map(|p| Tensor::from_slice(p)).collect::<Vec<_>>(), 0).view([1, total]);
            // the caller's memory is free to change once the call has returned
            for p in pieces.iter_mut() {
                p.iter_mut().for_each(|v| *v = f32::NAN);
            }
            assert!(dst.to_device(Device::Cpu).equal(&want), "{lens:?}: the staged copy differs");
        }
    }

    /// On a CUDA device: `rows_to_device` through the ring (one piece for the whole
    /// frame, one per channel for a band of rows or a frame cropped in height) gives the
    /// frame's rows as the CPU copy does.
    #[test]
    fn frames_and_bands_reach_the_device_intact() {
        let Some(dev) = crate::engine::device::cuda_for_test() else {
            return;
        };
        let frame = Array3::from_shape_fn((3, 700, 640), |(c, y, x)| (c * 1_000_000 + y * 1000 + x) as f32);
        let before = STAGED.with(|n| n.get());
        // a frame cropped in height: not contiguous across channels, each channel is
        let cropped = frame.slice(s![.., 100..600, ..]);
        let got = rows_to_device(cropped, 0, 500, dev).to_device(Device::Cpu);
        assert!(got.equal(&rows_to_device(cropped, 0, 500, Device::Cpu)), "the cropped frame differs");
        for (y0, y1) in [(0usize, 700usize), (123, 700), (5, 650)] {
            assert!(3 * (y1 - y0) * 640 * 4 >= SLOT_BYTES, "the case must be staged");
            let got = rows_to_device(frame.view(), y0, y1, dev).to_device(Device::Cpu);
            let want = rows_to_device(frame.view(), y0, y1, Device::Cpu);
            assert!(got.equal(&want), "rows {y0}..{y1} differ");
            let band = frame.slice(s![.., y0..y1, ..]);
            assert_eq!(got.size(), [1, 3, band.dim().1 as i64, 640]);
        }
        // every copy went through the ring (this thread's count: tests run on threads of their own)
        assert_eq!(STAGED.with(|n| n.get()), before + 4, "rows_to_device did not stage every copy");
    }
}
