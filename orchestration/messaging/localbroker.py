"""The embedded default's broker: kombu's file-system transport, made safe to share.

kombu's ``filesystem`` transport writes a message file in place, so a consumer in
another thread or process can pick the file up before it is written and fail to
decode it (which stops a Celery worker). This variant writes to a temporary name and
renames it into the queue, so a consumer only ever sees whole messages. File names
start with a zero-padded microsecond timestamp so that name order is arrival order.

A queue file that is not a kombu envelope (kombu's ``_get`` raises out of the
worker's loop on it) is kept as a dead letter in ``dead/`` beside the queue folder
(:mod:`orchestration.messaging.deadletters`), and the next file is taken.
"""

from __future__ import annotations

import os
import time
import uuid
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from orchestration.errors import NotAHop
from orchestration.messaging.deadletters import (
    FileDeadLetters,
    dead_letter,
    decode_envelope,
    file_store_beside,
)

SCHEME = "taskrailfs"


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{time.time_ns() // 1000:020d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"  # not a queue file name until renamed
        try:
            with open(partial, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """The oldest message of ``queue``, taken off it; a file that is not an envelope
        becomes a dead letter. Raises Empty."""
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            path = os.path.join(self.data_folder_in, name)
            taken = path + ".taken"  # not a queue file name: no other consumer takes it
            try:
                os.rename(path, taken)
            except OSError:  # another consumer took it first
                continue
            try:
                with open(taken, "rb") as fh:
                    raw = fh.read()
                os.remove(taken)
            except OSError as exc:
                raise ChannelError(f"Cannot read file {path!r} from queue.") from exc
            try:
                return decode_envelope(raw)
            except NotAHop as err:
                dead_letter(self.dead_letters(), str(queue), err.reason, raw)
        raise Empty()

    def dead_letters(self) -> FileDeadLetters:
        """This broker's dead letters: ``dead/`` beside the queue folder."""
        return file_store_beside(self.data_folder_in)


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = SCHEME
    driver_name = SCHEME


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
