"""A broken installation must give a clear message, never a bare loader error or a crash.
Run by scripts/test-installed.sh in a venv whose lumos wheel it then damages on purpose:
  broken.py CASE EXPECTED...   CASE: import (lumos.version()) or napari (a widget loads a model)
Passes when the error's message contains every EXPECTED string."""

import sys

case, expected = sys.argv[1], sys.argv[2:]
if case == "import":
    import lumos
    try:
        lumos.version()
    except lumos.LumosLibraryError as e:
        message = str(e)
    else:
        sys.exit("broken.py: lumos.version() worked on a broken installation")
elif case == "napari":
    # the widget reports the failure in its model field; napari keeps running
    import napari
    from napari_lumos._widgets import SegmentWidget

    viewer = napari.Viewer(show=False)
    w = SegmentWidget(viewer)
    w.load(sys.argv[0])  # any existing file: the library fails first
    message = str(w.model_info.value)
    viewer.close()
else:
    sys.exit(f"broken.py: unknown case {case}")
missing = [e for e in expected if e not in message]
print(f"broken.py {case}: {message}")
if missing:
    sys.exit(f"broken.py {case}: the message lacks {missing}")
