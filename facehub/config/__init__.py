"""Settings: the schema (``schema.py``), where values come from (``loader.py``), the reference (``reference.py``)."""

from facehub.config.loader import ENV_PREFIX, load
from facehub.config.schema import (DEDUP_POLICIES, MASK, SEARCH_MODES, SECRET_KEYS, SESSION_NEVER_EXPIRES,
                                   BrokerConfig, Config, ConfigError, ConsoleConfig, DetectorConfig, ForwarderConfig,
                                   MetricsConfig, RetentionConfig, SaverConfig, SupervisorConfig, default_spool_path, default_state_dir,
                                   opencv_threads)

__all__ = ["DEDUP_POLICIES", "ENV_PREFIX", "MASK", "SEARCH_MODES", "SECRET_KEYS", "SESSION_NEVER_EXPIRES",
           "BrokerConfig", "Config", "ConfigError", "ConsoleConfig", "DetectorConfig", "ForwarderConfig", "MetricsConfig", "RetentionConfig", "SaverConfig",
           "SupervisorConfig", "default_spool_path", "default_state_dir", "load", "opencv_threads"]
