"""Fresh-process memory probe: load an ONNX model in ORT, run it, print peak RSS as JSON (used by targets.bench)."""
import json
import resource
import sys

import numpy as np
import onnxruntime as ort

from edgec.core.procfs import status_bytes


def main(argv):
    model, feeds_path, threads, runs = argv[1], argv[2], int(argv[3]), int(argv[4])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    feeds = dict(np.load(feeds_path))
    for _ in range(runs):
        sess.run(None, feeds)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


def peak_rss_bytes() -> int:
    """VmHWM of this process (reset at exec, unlike ru_maxrss which inherits the parent's high-water mark)."""
    hwm = status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main(sys.argv)
