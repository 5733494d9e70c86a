import pytest

import gftvm
from reference import export, prepared_model


@pytest.fixture(scope="session")
def mcunet_onnx(tmp_path_factory):
    return export(prepared_model("mcunet"), tmp_path_factory.mktemp("mcunet") / "mcunet.onnx")


@pytest.fixture(scope="session")
def artifact_dir(mcunet_onnx, tmp_path_factory):
    """MCUNet, last 4 conv layers trained with SGD + momentum, batch 4, saved once."""
    directory = tmp_path_factory.mktemp("artifact")
    gftvm.compile(mcunet_onnx, trainable="last:4", batch_size=4, optimizer="sgd", lr=0.01,
                  momentum=0.9).save(directory)
    return directory
