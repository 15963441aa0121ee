package agent

import (
	"context"
	"net/http"
)

// I/O aggregation (issue 5): exports and the cluster filesystem. Owned by
// the filesystem work; these are its hook points.

func (a *Agent) startCFS(ctx context.Context) error        { return nil }
func (a *Agent) closeCFS() error                           { return nil }
func (a *Agent) cfsRoutes(mux *http.ServeMux, side string) {}
