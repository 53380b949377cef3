import argparse
import enum
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tether.cli_args import add_config_arguments, build_config
from tether.types.errors import ConfigurationError


class Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class DemoConfig(BaseModel):
    port: int = Field(8000, description="TCP port.")
    models: list[str] = Field(default_factory=lambda: ["a"], description="Models to serve.")
    aliases: dict[str, str] = Field(default_factory=dict, description="Name to directory.")
    verbose: bool = Field(False, description="Say more.")
    mode: Literal["lora", "full"] = Field("lora", description="Training mode.")
    ratio: float | None = Field(None, description="Optional ratio.")
    color: Color = Field(Color.RED, description="An enum.")


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DemoConfig)
    return build_config(DemoConfig, parser.parse_args(argv), env_prefix="DEMO_", environ=environ or {})


def test_defaults_env_and_flags_in_order_of_precedence():
    assert parse([]) == DemoConfig()
    cfg = parse(["--models", "x", "y", "--aliases", "Q=/m", "--verbose", "--mode", "full", "--ratio", "0.5"])
    assert cfg.models == ["x", "y"] and cfg.aliases == {"Q": "/m"} and cfg.verbose and cfg.mode == "full"
    assert cfg.ratio == 0.5
    assert parse(["--color", "blue"]).color is Color.BLUE
    with pytest.raises(SystemExit):
        parse(["--color", "green"])
    assert parse([], {"DEMO_PORT": "9000", "DEMO_MODELS": "p,q"}).port == 9000
    assert parse(["--port", "1"], {"DEMO_PORT": "9000"}).port == 1


def test_invalid_value_names_the_field():
    with pytest.raises(ConfigurationError, match="port"):
        parse([], {"DEMO_PORT": "not-a-number"})
    with pytest.raises(ConfigurationError, match="aliases"):
        parse(["--aliases", "novalue"])
