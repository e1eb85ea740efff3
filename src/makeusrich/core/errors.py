"""One exception root; each subclass says what an operator should do about it."""


class MakeUsRichError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(MakeUsRichError):
    """A setting or command-line option is invalid. Fix the named option and restart."""


class EmbeddedServiceError(MakeUsRichError):
    """An embedded broker or redis-server did not start. Check the log path in the message,
    free the port, or point MUR_KAFKA_BOOTSTRAP / MUR_REDIS_URL at external services."""


class IngestError(MakeUsRichError):
    """The ingestor cannot read its source. Check network access to Binance, the symbol
    list, or the replay file named in the message."""


class SourceFormatError(IngestError):
    """A replay file is not in a supported format (Binance trades/aggTrades CSV, plain or
    .zip, or mur JSONL). Convert it or pass the right file."""


class StreamError(MakeUsRichError):
    """The stream worker hit a broker or storage problem. Check Kafka and Redis health;
    the worker resumes from its committed offsets after a restart."""


class ModelError(MakeUsRichError):
    """A model artifact cannot be used. The worker keeps serving the previous model
    (or the naive baseline); replace or re-export the artifact named in the message."""


class ModelIntegrityError(ModelError):
    """model.onnx does not match the sha256 in its manifest: the file is corrupt or was
    swapped. Re-copy the version directory or retrain."""


class RegistryError(ModelError):
    """The model registry refused an operation or cannot be read: an unknown version, a
    version whose model.onnx does not match its manifest (or does not load), no earlier
    champion to roll back to, or an unreadable/unwritable registry or champion.json. Nothing
    was changed; re-import the version named in the message, promote another one, or fix
    the file or permissions it names."""


class TrainingError(MakeUsRichError):
    """Training could not run: usually too little data or torch missing. Install the
    `train` extra and pass more candles than the model window."""


class ApiError(MakeUsRichError):
    """A request cannot be served; the message is sent to the client with a 4xx status."""


class AccessError(MakeUsRichError):
    """An API-key operation was refused (``mur keys``, ``/admin``): an unknown key id, a
    plan without the limits it needs, or an invalid name or limit. Nothing was changed;
    check the id with ``mur keys list`` or fix the option named in the message."""
