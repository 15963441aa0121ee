package agent

import (
	"context"
	"net/http"
)

// Memory pool (issue 3): the RAM this node donates, served to other
// nodes' pagers. Stub; the memory pool slice fills it in.

// MemoryConfig configures the memory pool. Embedded in Config (the
// donation itself is Config.DonateMemory).
type MemoryConfig struct{}

func (c *MemoryConfig) validate() error { return nil }

func (a *Agent) startMem(_ context.Context) error { return nil }

func (a *Agent) closeMem() error { return nil }

func (a *Agent) memRoutes(_ *http.ServeMux, _ string) {}
