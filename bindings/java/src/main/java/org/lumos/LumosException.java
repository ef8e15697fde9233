package org.lumos;

/** A failed lumos call: the C status and the library's message of what was wrong. */
public class LumosException extends RuntimeException {
    private static final long serialVersionUID = 1L;
    /** The C status number (LUMOS_STATUS_*). */
    public final int status;
    /** The status name, for example "CANCELLED" or "SHAPE_MISMATCH". */
    public final String statusName;

    public LumosException(int status, String statusName, String message) {
        super(shortName(statusName) + ": " + message);
        this.status = status;
        this.statusName = shortName(statusName);
    }

    private static String shortName(String name) {
        return name != null && name.startsWith("LUMOS_STATUS_") ? name.substring("LUMOS_STATUS_".length()) : name;
    }

    /** True when the call stopped because its cancel token was cancelled. */
    public boolean isCancelled() {
        return status == Lumos.STATUS_CANCELLED;
    }
}
