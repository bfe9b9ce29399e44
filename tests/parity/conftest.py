"""Fixtures of the ported PEFT test cases (test_peft_contract*.py): PEFT's tiny test models, built once."""

import pytest
from peft_contract_models import MODEL_KINDS


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    from peft_contract_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("peft-contract-models"))


@pytest.fixture(params=list(MODEL_KINDS))
def model_id(request, model_dirs):
    return model_dirs[request.param]
