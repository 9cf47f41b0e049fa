"""Hooks for the kill tests (test_reliability_kill.py), installed in the child process only (the code under test
is unchanged): they slow a command's writes down with sleeps, so that a kill lands mid-write without the tests
being slow, and append each phase the child reaches to an events file that the test watches."""

import os
import time


def install_hooks(kind: str, events: str, pause: float) -> None:
    """Slow the writes of a ``kind`` of job (``native...``: save_native's; ``export...``: an export's or import's;
    ``...two-renames``: as on a filesystem without RENAME_EXCHANGE; ``train``: a training checkpoint's save and
    pruning) by ``pause`` seconds around each, noting each phase in the file ``events``."""
    import shutil
    def note(what):
        with open(events, "a") as handle:
            handle.write(what + "\n")
    def slowed(function, before, after=None, pause=pause):
        def wrapper(*args, **kwargs):
            note(before(*args, **kwargs) if callable(before) else before)
            time.sleep(pause)
            result = function(*args, **kwargs)
            if after:
                note(after)
                time.sleep(pause)
            return result
        return wrapper
    def slow_writer(real):  # a shard writer (path, tensors, produce, *rest) that notes the file, sleeps per tensor
        def write(path, tensors, produce, *rest, **kwargs):
            note("write " + path.name)
            def produce_slowly(name):
                time.sleep(pause)
                return produce(name)
            return real(path, tensors, produce_slowly, *rest, **kwargs)
        return write
    if kind.startswith("native"):  # save_native's own writes: the shards, the index, side files, manifest
        import gemma3vl.bridge.from_model as from_model
        from_model.write_in_canonical_order = slow_writer(from_model.write_in_canonical_order)
        from_model.write_index = slowed(from_model.write_index, "index", pause=20 * pause)
        from_model.copy_file_durable = slowed(from_model.copy_file_durable, lambda _, target: "side " + target.name)
        from_model.write_text_durable = slowed(from_model.write_text_durable, "manifest", pause=20 * pause)
    if kind.startswith(("export", "native")):
        import gemma3vl.bridge.convert as convert, gemma3vl.bridge.fsutil as fsutil
        convert.write_safetensors = slow_writer(convert.write_safetensors)
        convert.write_in_canonical_order = slow_writer(convert.write_in_canonical_order)  # what import writes with
        fsutil.fsync_dir = slowed(fsutil.fsync_dir, "fsync-dir")
        if kind.endswith("two-renames"):
            fsutil._exchange = lambda a, b: False  # as on a filesystem without RENAME_EXCHANGE
        else:
            fsutil._exchange = slowed(fsutil._exchange, "swap", "swapped", pause=20 * pause)
        os.rename = slowed(os.rename, lambda a, b, **kw: "rename " + os.path.basename(a), "renamed", pause=20 * pause)
        shutil.rmtree = slowed(shutil.rmtree, lambda path, *a, **kw: "rmtree " + os.path.basename(path))
    elif kind == "train":
        import torch.distributed.checkpoint as dcp
        import gemma3vl.train.checkpoint as checkpoint
        dcp.save = slowed(dcp.save, lambda state, **kw: "save " + os.path.basename(kw["checkpoint_id"]), "saved")
        writer = dcp.FileSystemWriter
        writer.finish = slowed(writer.finish, "metadata")
        checkpoint._fsync_tree = slowed(checkpoint._fsync_tree, "fsync", "fsynced")
        os.replace = slowed(os.replace, lambda a, b, **kw: "replace " + os.path.basename(a), "replaced")
        checkpoint._prune = slowed(checkpoint._prune, "prune", "pruned")
        def remove_slowly(path, ignore_errors=False):  # file by file, the COMPLETE marker among the last
            if not os.path.isdir(path):
                if ignore_errors:
                    return
                raise FileNotFoundError(path)
            note("rmtree " + os.path.basename(path))
            for root, dirs, files in os.walk(path, topdown=False):
                for name in sorted(files, reverse=True):
                    time.sleep(pause)
                    os.unlink(os.path.join(root, name))
                for name in dirs:
                    os.rmdir(os.path.join(root, name))
            os.rmdir(path)
        shutil.rmtree = remove_slowly
