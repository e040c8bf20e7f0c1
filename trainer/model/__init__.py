from trainer.model.config import ModelConfig
from trainer.model.llama import Llama

__all__ = ["Llama", "ModelConfig"]
