"""Lightning callbacks for zeroth-order training; they work in any Lightning project."""
