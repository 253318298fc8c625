// helm-render renders Helm chart templates the way `helm template` does: Go's text/template
// with the Sprig function library (both as Helm uses them) plus Helm's own toYaml, include
// and required. It stands in for the helm binary, which no registry reachable here ships.
//
// Usage: helm-render CHART/templates/TEMPLATE... < root.json
// root.json is the template data: {"Values": ..., "Chart": ..., "Release": ...}; .Files
// reads the chart's files (symlinks followed, as `helm package` does). Each template's
// output is printed after a "---" line. Built by tests/tests/deploy_manifests.rs
// with Debian's golang-go and golang-github-masterminds-sprig-dev, in GOPATH mode.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig/v3"
	"gopkg.in/yaml.v3"
)

// toYaml as Helm defines it: the YAML document without its final newline, "" on error.
// Helm encodes with sigs.k8s.io/yaml, which Debian does not package; yaml.v3 writes the same
// documents (sequences indented one more step, which parses the same).
func toYaml(v interface{}) string {
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return ""
	}
	return strings.TrimSuffix(out.String(), "\n")
}

// chartFiles is .Files: Get returns a chart file's content, "" when it cannot be read.
type chartFiles struct{ dir string }

func (f chartFiles) Get(name string) string {
	data, err := os.ReadFile(filepath.Join(f.dir, name))
	if err != nil {
		return ""
	}
	return string(data)
}

func main() {
	var root map[string]interface{}
	if err := json.NewDecoder(os.Stdin).Decode(&root); err != nil {
		fmt.Fprintln(os.Stderr, "helm-render: reading the template data:", err)
		os.Exit(2)
	}
	if len(os.Args) > 1 {
		root["Files"] = chartFiles{dir: filepath.Dir(filepath.Dir(os.Args[1]))}
	}
	tpl := template.New("chart")
	funcs := sprig.TxtFuncMap()
	funcs["toYaml"] = toYaml
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var out bytes.Buffer
		err := tpl.ExecuteTemplate(&out, name, data)
		return out.String(), err
	}
	funcs["required"] = func(message string, value interface{}) (interface{}, error) {
		if value == nil || value == "" {
			return nil, fmt.Errorf("%s", message)
		}
		return value, nil
	}
	// A value the chart names but the values lack is an error, not an empty string: a typo
	// in a template or in values.yaml cannot pass unseen.
	tpl = tpl.Funcs(funcs).Option("missingkey=error")
	for _, path := range os.Args[1:] {
		text, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "helm-render:", err)
			os.Exit(2)
		}
		if _, err := tpl.New(filepath.Base(path)).Parse(string(text)); err != nil {
			fmt.Fprintln(os.Stderr, "helm-render:", err)
			os.Exit(1)
		}
	}
	for _, path := range os.Args[1:] {
		var out bytes.Buffer
		if err := tpl.ExecuteTemplate(&out, filepath.Base(path), root); err != nil {
			fmt.Fprintln(os.Stderr, "helm-render:", err)
			os.Exit(1)
		}
		fmt.Printf("---\n# Source: %s\n%s\n", filepath.Base(path), out.String())
	}
}
