"""Classifier service: disc features in (JSON), narrowing probability, label and model version out.

bentoml serve services/classifier/service.py:Classifier --port 3004
"""

from __future__ import annotations

import bentoml
import numpy as np

from discgeo import __version__
from discgeo.classification import NarrowingClassifier
from discgeo.config import Settings
from discgeo.errors import InvalidDataError
from discgeo.schemas import NarrowingPrediction, NarrowingRequest
from discgeo.serving import DISCS, check_tokens, protect, record_model, stage_request

STAGE = "classifier"


@bentoml.service(
    name="discgeo-classifier",
    traffic={"timeout": 30, "concurrency": 32},
    resources={"cpu": "1"},
    labels={"discgeo_version": __version__},
)
class Classifier:
    def __init__(self) -> None:
        check_tokens()
        self.model = NarrowingClassifier.from_artifact(Settings.from_env().artifact("classifier"))
        record_model(STAGE, self.model.version)

    @bentoml.api(route="/predict", input_spec=NarrowingRequest)
    def predict(self, **request: object) -> NarrowingPrediction:
        """Narrowing probability for each disc (features by name, or rows in ``features`` order)."""
        with stage_request(STAGE):
            body = NarrowingRequest.model_validate(request)
            self.model.check_encoder(body.encoder_version)
            if (body.discs is None) == (body.rows is None):
                raise InvalidDataError("give exactly one of 'discs' (features by name) or 'rows'")
            width = len(self.model.features)
            if body.rows is not None and any(len(row) != width for row in body.rows):
                raise InvalidDataError(
                    f"every row of 'rows' must hold {width} numbers ({', '.join(self.model.features)})"
                )
            data = body.discs if body.discs is not None else np.asarray(body.rows, dtype=np.float64)
            probabilities, labels = self.model.predict(data)
            DISCS.labels(stage=STAGE).inc(len(labels))
            return NarrowingPrediction(
                probabilities=probabilities.tolist(),
                labels=labels.tolist(),
                threshold=self.model.threshold,
                features=list(self.model.features),
                model_version=self.model.version,
            )


protect(Classifier, max_body_bytes=1024**2)  # 1000 rows of features fit in ~200 kB
