//! Host frames to a CUDA device through page-locked staging buffers.
//!
//! libtorch copies a tensor from pageable host memory (a caller's frame) through the CUDA
//! driver's own staging, one thread copying into it: a 5 x 1024 x 1024 float32 frame took
//! 1.6 ms on the session-13 GPU machines, where the transfer from page-locked memory alone
//! took 0.84 ms. Here the frame goes through a ring of page-locked slots: libtorch's CPU
//! thread pool copies a piece of the frame into a slot while the DMA engine transfers the
//! previous piece, and the host does not wait for the last transfer. The transfers are
//! queued on the legacy default stream, the stream on which libtorch (through tch) runs
//! everything, so the kernels queued after them wait for them and the host goes on to
//! queue those kernels while the transfers run. A slot is rewritten only after its last
//! transfer has finished (one event per slot).
//!
//! The ring is [`SLOTS`] x [`SLOT_BYTES`] (16 MiB) of page-locked memory per device,
//! allocated at the first staged copy and kept for the life of the process. Where anything
//! fails (no driver library, an allocation or a transfer refused) [`copy_to_device`]
//! returns `false` (logged once per device) and the caller copies with libtorch.
//! `LUMOS_CUDA_STAGED_COPY=0` switches staging off.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use tch::{Device, Kind, Tensor};

use crate::nn::cuda_norm::ContextGuard;

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

// SAFETY: the slots' memory is owned by the ring and only touched under the RINGS lock.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        let _g = ContextGuard::save();
        for s in &self.slots {
            // the slot's transfers must have finished before its memory goes back
            let _ = s.event.synchronize();
            // SAFETY: allocated by malloc_host in Ring::new, freed once, no transfer pending.
            let _ = unsafe { cudarc::driver::result::free_host(s.ptr as *mut std::ffi::c_void) };
        }
    }
}

impl Ring {
    fn new(ordinal: usize) -> Result<Ring, String> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) is not on the library path".into());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context of device {ordinal}: {e}"))?;
        let mut ring = Ring { stream: ctx.default_stream(), ctx, slots: Vec::with_capacity(SLOTS) };
        for _ in 0..SLOTS {
            let event = ring.ctx.new_event(None).map_err(|e| format!("event: {e}"))?;
            ring.ctx.bind_to_thread().map_err(|e| e.to_string())?;
            // SAFETY: a plain page-locked allocation in the device's primary context (the
            // context libtorch uses), freed in Drop.
            let ptr = unsafe { cudarc::driver::result::malloc_host(SLOT_BYTES, 0) }
                .map_err(|e| format!("page-locked allocation of {SLOT_BYTES} bytes: {e}"))?;
            ring.slots.push(Slot { ptr: ptr as *mut f32, event });
        }
        Ok(ring)
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
static RINGS: Lazy<Mutex<HashMap<usize, Option<Ring>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

fn enabled() -> bool {
    static ON: Lazy<bool> = Lazy::new(|| !crate::device::switched_off("LUMOS_CUDA_STAGED_COPY"));
    *ON
}

/// Copies the host slices `pieces`, in order, into the float32 CUDA tensor `dst`
/// (contiguous, with exactly as many elements as the pieces together) through the device's
/// page-locked ring; the transfers are queued on the legacy default stream and may still be
/// running on return (work queued after them on that stream waits for them; the pieces'
/// memory is no longer read). `false` where staging is switched off, does not apply or
/// failed: the caller copies another way (`dst` may then hold part of the pieces).
pub fn copy_to_device(pieces: &[&[f32]], dst: &Tensor) -> bool {
    let Device::Cuda(ordinal) = dst.device() else { return false };
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    if !enabled() || dst.kind() != Kind::Float || !dst.is_contiguous() || dst.numel() != total || total == 0 {
        return false;
    }
    let mut rings = RINGS.lock();
    let entry = rings.entry(ordinal).or_insert_with(|| {
        // cudarc panics where a library symbol is missing: keep that inside
        let _g = ContextGuard::save();
        match std::panic::catch_unwind(|| Ring::new(ordinal)).unwrap_or_else(|_| Err("the CUDA driver library failed to load".into())) {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!("staged frame copies unavailable on device {ordinal}, libtorch copies the frames: {e}");
                None
            }
        }
    });
    let Some(ring) = entry.as_mut() else { return false };
    let _g = ContextGuard::save();
    match ring.copy(pieces, dst.data_ptr() as u64) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("a staged frame copy failed on device {ordinal}, libtorch copies the frames from now on: {e}");
            // dropping the ring waits for its pending transfers before freeing its memory
            *entry = None;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a CUDA device (skipped without one): staged copies equal libtorch's, for one piece
    /// and several, shorter than a slot, not a multiple of one, and longer than the ring
    /// (slots reused while earlier transfers may still run); the host memory may be reused
    /// as soon as the call returns.
    #[test]
    fn staged_copies_equal_libtorchs() {
        if !crate::device::cuda_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let dev = Device::Cuda(0);
        for lens in [vec![1000usize], vec![SLOT_ELEMS + 7], vec![SLOTS * SLOT_ELEMS * 2 + 12345], vec![300_000, 5, SLOT_ELEMS * 3]] {
            let mut pieces: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(p, &n)| (0..n).map(|i| (i as f32) * 0.5 + p as f32 * 1e6).collect())
                .collect();
            let total: usize = lens.iter().sum();
            let dst = Tensor::empty([total as i64], (Kind::Float, dev));
            let refs: Vec<&[f32]> = pieces.iter().map(|p| p.as_slice()).collect();
            assert!(copy_to_device(&refs, &dst), "{lens:?}: staging refused");
            let want = Tensor::cat(&pieces.iter().map(|p| Tensor::from_slice(p)).collect::<Vec<_>>(), 0);
            // the caller's memory is free to change once the call has returned
            for p in pieces.iter_mut() {
                p.iter_mut().for_each(|v| *v = f32::NAN);
            }
            let got = dst.to_device(Device::Cpu);
            assert!(got.equal(&want), "{lens:?}: the staged copy differs");
        }
    }
}
