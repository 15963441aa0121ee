package agent

import (
	"context"
	"net/http"
)

// Services (issue 5): ports of one node carried over the fabric to
// listeners on others. Stub; the services slice fills it in.

// ServiceConfig configures exposed services. Embedded in Config, so its
// JSON keys sit at the top level of the config file.
type ServiceConfig struct{}

func (c *ServiceConfig) validate() error { return nil }

func (a *Agent) startService(_ context.Context) error { return nil }

func (a *Agent) closeService() error { return nil }

func (a *Agent) serviceRoutes(_ *http.ServeMux, _ string) {}
