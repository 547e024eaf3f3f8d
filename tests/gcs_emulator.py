"""A Google Cloud Storage API on 127.0.0.1 for the tests: `gcp-storage-emulator`,
in memory, with one bucket.

    python tests/gcs_emulator.py PORT BUCKET

One gap of the emulator is filled here: its media downloads carry no
`x-goog-generation` header, which tensorstore (orbax's array store) needs on
every read ("Malformed StorageGeneration"); real GCS always sends it. The
download handler below adds it (and `x-goog-metageneration`) from the
object's metadata. Nothing else is changed.
"""
import sys

from gcp_storage_emulator import server as server_lib
from gcp_storage_emulator.handlers import objects


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"],
                               request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


_download = objects.download


def main(port: int, bucket: str) -> None:
  objects.download = _download_with_generation
  # The routing table holds the functions themselves: point it at the patch.
  handlers = []
  for pattern, methods in server_lib.HANDLERS:
    handlers.append((pattern, {m: (_download_with_generation
                                   if f is _download else f)
                               for m, f in methods.items()}))
  server_lib.HANDLERS = tuple(handlers)
  server = server_lib.create_server("127.0.0.1", port, in_memory=True,
                                    default_bucket=bucket)
  server.run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
