package agent

import (
	"context"
	"net/http"
)

// One process space (issue 4): the agent's process manager. Owned by the
// process work; these are its hook points.

func (a *Agent) startProc(ctx context.Context) error        { return nil }
func (a *Agent) closeProc() error                           { return nil }
func (a *Agent) procRoutes(mux *http.ServeMux, side string) {}
