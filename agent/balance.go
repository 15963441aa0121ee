package agent

import (
	"context"
	"net/http"
)

// Load balancing and drain (issue 4). Stub; the balancer slice fills it in.

// BalanceConfig configures the load balancer. Embedded in Config.
type BalanceConfig struct{}

func (c *BalanceConfig) validate() error { return nil }

func (a *Agent) startBalance(_ context.Context) error { return nil }

func (a *Agent) closeBalance() error { return nil }

func (a *Agent) balanceRoutes(_ *http.ServeMux, _ string) {}

// schedulable reports whether new and moved processes may be placed on
// node (false for a drained, cordoned node).
func (a *Agent) schedulable(_ string) bool { return true }
