package org.lumos;

import com.sun.jna.Pointer;
import com.sun.jna.ptr.PointerByReference;

/** A cancellation flag for segment, decompose and train; {@link #cancel()} from any thread. */
public final class CancelToken implements AutoCloseable {
    private Pointer handle;

    public CancelToken() {
        PointerByReference p = new PointerByReference();
        Lumos.check(Lumos.lib().lumos_cancel_token_new(p));
        handle = p.getValue();
    }

    /** Asks the running operation to stop at its next tile or iteration. Thread-safe. */
    public synchronized void cancel() {
        if (handle != null) {
            Lumos.check(Lumos.lib().lumos_cancel_token_cancel(handle));
        }
    }

    /** Clears the flag so the token can be reused. */
    public synchronized void reset() {
        if (handle != null) {
            Lumos.check(Lumos.lib().lumos_cancel_token_reset(handle));
        }
    }

    synchronized Pointer handle() {
        return handle;
    }

    /** Frees the token; no operation may still be using it. */
    @Override
    public synchronized void close() {
        if (handle != null) {
            Lumos.lib().lumos_cancel_token_free(handle);
            handle = null;
        }
    }
}
