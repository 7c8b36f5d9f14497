from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    IN_DISTRIBUTION: _ClassVar[Verdict]
    OOD: _ClassVar[Verdict]
    CORRUPTED: _ClassVar[Verdict]
    ADVERSARIAL: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
IN_DISTRIBUTION: Verdict
OOD: Verdict
CORRUPTED: Verdict
ADVERSARIAL: Verdict

class Image(_message.Message):
    __slots__ = ("raw", "encoded")
    RAW_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    raw: RawPixels
    encoded: bytes
    def __init__(self, raw: _Optional[_Union[RawPixels, _Mapping]] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class RawPixels(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[RawPixels.DType]
        UINT8: _ClassVar[RawPixels.DType]
        FLOAT32: _ClassVar[RawPixels.DType]
    DTYPE_UNSPECIFIED: RawPixels.DType
    UINT8: RawPixels.DType
    FLOAT32: RawPixels.DType
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: RawPixels.DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[RawPixels.DType, str]] = ...) -> None: ...

class AssessRequest(_message.Message):
    __slots__ = ("images", "request_id", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    request_id: str
    model: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("in_distribution", "ood", "corrupted", "adversarial")
    IN_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    CORRUPTED_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    in_distribution: float
    ood: float
    corrupted: float
    adversarial: float
    def __init__(self, in_distribution: _Optional[float] = ..., ood: _Optional[float] = ..., corrupted: _Optional[float] = ..., adversarial: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "forward_ms", "gradients_ms", "detector_ms", "total_ms", "batch_size", "squeeze_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_MS_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SQUEEZE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    forward_ms: float
    gradients_ms: float
    detector_ms: float
    total_ms: float
    batch_size: int
    squeeze_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., forward_ms: _Optional[float] = ..., gradients_ms: _Optional[float] = ..., detector_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., squeeze_ms: _Optional[float] = ...) -> None: ...

class ImageAssessment(_message.Message):
    __slots__ = ("predicted_class", "predicted_name", "probabilities", "verdict", "scores", "timings")
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    predicted_class: int
    predicted_name: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    verdict: Verdict
    scores: Scores
    timings: Timings
    def __init__(self, predicted_class: _Optional[int] = ..., predicted_name: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class AssessResponse(_message.Message):
    __slots__ = ("results", "request_id", "error")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageAssessment]
    request_id: str
    error: RequestError
    def __init__(self, results: _Optional[_Iterable[_Union[ImageAssessment, _Mapping]]] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("predicted_class", "predicted_name", "probabilities")
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    predicted_class: int
    predicted_name: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, predicted_class: _Optional[int] = ..., predicted_name: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "timings")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    timings: Timings
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("classes", "input_shape", "classifier_version", "classifier_sha256", "detector_version", "detector_sha256", "verdicts", "max_images_per_request", "device", "name", "resizes_encoded")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_SHA256_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESIZES_ENCODED_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    classifier_version: str
    classifier_sha256: str
    detector_version: str
    detector_sha256: str
    verdicts: _containers.RepeatedScalarFieldContainer[str]
    max_images_per_request: int
    device: str
    name: str
    resizes_encoded: bool
    def __init__(self, classes: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., classifier_version: _Optional[str] = ..., classifier_sha256: _Optional[str] = ..., detector_version: _Optional[str] = ..., detector_sha256: _Optional[str] = ..., verdicts: _Optional[_Iterable[str]] = ..., max_images_per_request: _Optional[int] = ..., device: _Optional[str] = ..., name: _Optional[str] = ..., resizes_encoded: _Optional[bool] = ...) -> None: ...
