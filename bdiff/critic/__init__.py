"""Learned critic (time-conditioned discriminator) that flags samples and regions for another pass."""

from bdiff.critic.critic import Critic, load_critic
from bdiff.critic.net import CriticConfig, CriticNet

__all__ = ["Critic", "CriticConfig", "CriticNet", "load_critic"]
