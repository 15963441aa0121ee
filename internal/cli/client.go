package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
)

// agentAddress is the agent the CLI talks to: --agent, $ONEBOX_AGENT,
// the socket in --data-dir, or the default socket.
func agentAddress(cmd *cobra.Command) string {
	addr, _ := cmd.Flags().GetString("agent")
	if addr == "" {
		addr = os.Getenv("ONEBOX_AGENT")
	}
	if addr == "" {
		if dataDir, _ := cmd.Flags().GetString("data-dir"); dataDir != "" {
			return "unix://" + dataDir + "/agent.sock"
		}
		return api.DefaultAgent
	}
	return addr
}

// memberIdentity loads this machine's member identity, which an https
// agent address needs for mutual TLS.
func memberIdentity(cmd *cobra.Command) (*identity.Identity, error) {
	dataDir, _ := cmd.Flags().GetString("data-dir")
	if dataDir == "" {
		dataDir = agent.DefaultDataDir
	}
	id, err := identity.Load(dataDir)
	if err != nil {
		return nil, fmt.Errorf("an https agent address needs this machine's member certificate: %w", err)
	}
	return id, nil
}

// readCommand is the start of every read verb: the -o format and a client.
func readCommand(cmd *cobra.Command) (string, *api.Client, error) {
	format, err := outputFormat(cmd)
	if err != nil {
		return "", nil, err
	}
	cl, err := clientFor(cmd)
	return format, cl, err
}

// clientFor returns an API client for the agent named by agentAddress.
func clientFor(cmd *cobra.Command) (*api.Client, error) {
	addr := agentAddress(cmd)
	if strings.HasPrefix(addr, "https://") {
		id, err := memberIdentity(cmd)
		if err != nil {
			return nil, err
		}
		return api.NewClient(addr, id.ClientTLS())
	}
	c, err := api.NewClient(addr, nil)
	if err != nil {
		return nil, usageError{err}
	}
	return c, nil
}

// addOutputFlag adds -o/--output to a read command.
func addOutputFlag(c *cobra.Command) {
	c.Flags().StringP("output", "o", "table", "output format: table or json")
}

func outputFormat(cmd *cobra.Command) (string, error) {
	o, _ := cmd.Flags().GetString("output")
	switch o {
	case "table", "json":
		return o, nil
	}
	return "", usagef("unknown output format %q: use table or json", o)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func size(b uint64) string { return agent.ByteSize(b).String() }

// getAndPrint is the body of a read command: it asks the agent for path,
// prints the answer (JSON with -o json, else a table by print), and returns
// it, so the caller can set the exit status from what it says (nodes that
// did not answer).
func getAndPrint[T any](cmd *cobra.Command, path string, print func(io.Writer, T) error) (T, error) {
	var v T
	format, cl, err := readCommand(cmd)
	if err != nil {
		return v, err
	}
	if err := cl.Get(cmd.Context(), path, &v); err != nil {
		return v, err
	}
	if format == "json" {
		return v, writeJSON(cmd.OutOrStdout(), v)
	}
	return v, print(cmd.OutOrStdout(), v)
}
