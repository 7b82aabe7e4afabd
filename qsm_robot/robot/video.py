"""MP4 video from RGB frames, streamed to ffmpeg (imageio's ffmpeg plugin, ``imageio-ffmpeg``).

Frames go to the encoder as they come, never held in memory. The file is written under a
temporary name beside the target (``.NAME.partial.mp4``) and renamed when it is complete, so an
interrupted or failed recording never leaves a half-written file under the final name.

    with VideoWriter("run.mp4", fps=50) as video:   # or write_video("run.mp4", frames, fps=50)
        for frame in frames:                         # uint8, height x width x 3, all the same size
            video.add(frame)

:class:`BackgroundRecorder` renders and encodes on a thread of its own, for a real-time loop that
must not wait for either (software OpenGL takes ~25 ms for a 320x240 MuJoCo frame).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

MAX_FPS = 50.0
"""Highest frame rate recorded: a faster control loop contributes every n-th tick (frame_stride)."""


class VideoError(RuntimeError):
    """A video that cannot be written; the message says why."""


def frame_stride(rate_hz: float, max_fps: float = MAX_FPS) -> int:
    """Ticks per frame, so that a loop at ``rate_hz`` is recorded at no more than ``max_fps``."""
    if rate_hz <= 0 or max_fps <= 0:
        raise ValueError(f"rate_hz and max_fps must be > 0, got {rate_hz} and {max_fps}")
    return max(1, math.ceil(rate_hz / max_fps - 1e-9))


class VideoWriter:
    """An MP4 (H.264, yuv420p) at ``fps`` frames per second, completed by ``close()``."""

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        """Where the finished video goes."""
        if self.path.suffix.lower() != ".mp4":
            raise VideoError(f"video {self.path}: the file name must end in .mp4")
        if not fps > 0:
            raise VideoError(f"video {self.path}: fps must be > 0, got {fps}")
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401  (the encoder binary; imageio alone cannot write mp4)
        except ImportError as exc:
            raise VideoError(f"video {self.path}: needs imageio and imageio-ffmpeg ({exc.name} is missing): "
                             "pip install imageio imageio-ffmpeg (both are in the train extra)") from None
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        """The file being written; renamed to ``path`` by close()."""
        self.fps = float(fps)
        self.frames = 0
        """Frames written so far."""
        self.shape: tuple[int, ...] | None = None
        """Height, width, 3 of the first frame; every frame must match it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # macro_block_size=1: imageio must not resize; yuv420p needs even sizes, checked in add().
            self._writer = imageio.get_writer(self.tmp, format="FFMPEG", mode="I", fps=self.fps, codec="libx264",
                                              pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
        except Exception as exc:
            raise VideoError(f"video {self.path}: cannot start the encoder: {exc}") from None

    def add(self, frame: np.ndarray) -> None:
        """Encode one frame: uint8, height x width x 3 (RGB), even sizes, all frames alike."""
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise VideoError(f"video {self.path}: a frame must be uint8 of shape (height, width, 3), got {got}")
        if self.shape is None:
            if frame.shape[0] % 2 or frame.shape[1] % 2:
                raise VideoError(f"video {self.path}: frame height and width must be even, got {frame.shape[:2]}")
            self.shape = frame.shape
        elif frame.shape != self.shape:
            raise VideoError(f"video {self.path}: frame {self.frames} has shape {frame.shape}, the first {self.shape}")
        try:
            self._writer.append_data(frame)
        except Exception as exc:
            raise VideoError(f"video {self.path}: the encoder failed: {exc}") from None
        self.frames += 1

    def close(self) -> Path:
        """Finish the file and move it to ``path`` (replacing one there); returns ``path``. A video
        with no frame is not written."""
        try:
            self._writer.close()
        except Exception as exc:
            self.abort()
            raise VideoError(f"video {self.path}: the encoder failed: {exc}") from None
        if self.frames == 0:
            self.abort()
            raise VideoError(f"video {self.path}: no frame was recorded")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop without a video: the partial file is removed."""
        try:
            self._writer.close()
        except Exception:
            pass  # the encoder may be what failed; the file goes either way
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    """Write ``frames`` (uint8, height x width x 3) to the MP4 ``path`` at ``fps``; returns ``path``."""
    with VideoWriter(path, fps) as video:
        for frame in frames:
            video.add(frame)
    return video.path


RENDER_NICENESS = 19
"""The render thread runs at the lowest CPU priority: the control loop never waits for a frame."""


def lower_thread_priority(niceness: int = RENDER_NICENESS) -> bool:
    """Give the calling thread the lowest CPU priority (Linux: a thread's nice value is its own).

    Returns whether it was applied; elsewhere, or when refused, the thread runs on as it was.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        return True
    except (AttributeError, OSError):
        return False


class BackgroundRecorder:
    """Turns snapshots into frames (``render``) and encodes them (``writer``) on its own thread.

    The loop calls ``offer(index, snapshot)`` every frame slot (index 0, 1, 2, ...): it costs a
    queue put, never a wait. When the renderer falls behind and the queue is full, the snapshot is
    dropped and its slot repeats the previous frame, so the video keeps the loop's timing. ``render``
    runs only on the recorder's thread (it may own a GL context there); ``release``, if given, is
    called on that thread when it ends (to free such a context).
    """

    def __init__(self, writer: VideoWriter, render: Callable[[Any], np.ndarray], log: Callable[[str], None],
                 release: Callable[[], None] | None = None, queue_size: int = 64):
        self.writer, self.render, self.release, self.log = writer, render, release, log
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        """Snapshots dropped because the renderer was behind (their slots repeat a frame)."""
        self.repeated = 0
        """Frames written twice or more to fill missed slots."""
        self.error: BaseException | None = None
        """What stopped the renderer or the encoder (the video is then discarded)."""
        self._first = threading.Event()
        self._last_index = -1
        self._thread = threading.Thread(target=self._run, name="video", daemon=True)

    def start(self, first: Any) -> None:
        """Start the thread and render ``first`` into slot 0; raise what rendering or encoding it
        raised (the video is then discarded)."""
        self.queue.put((0, first))
        self._thread.start()
        self._first.wait()
        if self.error is not None:
            self.finish(complete=False)
            raise self.error

    def offer(self, index: int, snapshot: Any) -> None:
        """Queue the snapshot of frame slot ``index`` (increasing); never blocks."""
        if self.error is not None:
            return
        try:
            self.queue.put_nowait((index, snapshot))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        previous: np.ndarray | None = None
        lower_thread_priority()
        try:
            while (item := self.queue.get()) is not None:
                index, snapshot = item
                frame = self.render(snapshot)
                if previous is not None:
                    for _ in range(index - self._last_index - 1):  # missed slots: hold the previous frame
                        self.writer.add(previous)
                        self.repeated += 1
                self.writer.add(frame)
                previous, self._last_index = frame, index
                self._first.set()
        except BaseException as exc:  # reported by start() or finish()
            self.error = exc
            self._first.set()
            while self.queue.get() is not None:  # keep draining until finish() says stop
                pass
        finally:
            if self.release is not None:
                try:
                    self.release()
                except Exception as exc:
                    self.log(f"video: freeing the renderer failed: {type(exc).__name__}: {exc}")

    def finish(self, complete: bool) -> Path | None:
        """Stop the thread; with ``complete``, finish the file and return its path (None when the
        renderer or encoder had failed, which is logged); else discard it."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join()
        if self.error is not None or not complete:
            self.writer.abort()
            if self.error is not None and complete:
                self.log(f"video stopped, no file written: {type(self.error).__name__}: {self.error}")
            return None
        return self.writer.close()
